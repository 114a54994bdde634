//! A small typed writer for unit files (systemd.syntax(7), systemd.service(5)).
//!
//! The caller states *what* each value is (text, a command line, an environment
//! assignment, or raw syntax) and the renderer applies the matching escaping, so a path
//! with a space or a `%` in a description cannot silently change the unit's meaning:
//! - every value: `%` starts a specifier (`%h`, `%n`...), so a literal `%` is `%%`; a
//!   newline or a trailing `\` would end or continue the line, so they are refused;
//! - command lines: each argument is double-quoted with C escapes, and `$` is `$$`
//!   (systemd expands `$VAR` in `ExecStart=`);
//! - `Environment=`: each `NAME=value` is one double-quoted word.
//!
//! `raw` values are written as given (after the line checks) for directives whose syntax
//! the caller means literally, e.g. `SystemCallFilter=@system-service` or `%h` paths.

use std::fmt::Write as _;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UnitError {
    #[error("invalid section name {0:?}")]
    BadSection(String),
    #[error("invalid key {0:?} (letters, digits and '-' only)")]
    BadKey(String),
    #[error("{key}: a value must not contain a newline or a NUL")]
    Newline { key: String },
    #[error("{key}: a value must not end with a backslash (it would continue the line)")]
    TrailingBackslash { key: String },
    #[error("{key}: a command line needs at least the program")]
    EmptyCommand { key: String },
    #[error("{key}: invalid environment variable name {name:?}")]
    BadEnvName { key: String, name: String },
    #[error("{key}: list item {item:?} contains whitespace")]
    SpaceInListItem { key: String, item: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    /// Free text: specifiers escaped.
    Text(String),
    /// Written as is.
    Raw(String),
    /// `ExecStart=` style: prefix flags (e.g. `-`, `+`, `!`), then quoted argv.
    Exec { prefix: String, argv: Vec<String> },
    /// `Environment=` style: one quoted NAME=value.
    Env { name: String, value: String },
    /// Space-separated words (e.g. `ReadWritePaths=`), each escaped as text.
    List(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Line {
    Comment(String),
    Entry { key: String, value: Value },
}

/// One `[Section]` of a unit file. Keys may repeat (e.g. several `ExecStartPre=`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    name: String,
    lines: Vec<Line>,
}

impl Section {
    fn push(&mut self, key: &str, value: Value) -> &mut Self {
        self.lines.push(Line::Entry {
            key: key.to_string(),
            value,
        });
        self
    }

    /// A `# comment` line (each line of `text` becomes a comment line).
    pub fn comment(&mut self, text: &str) -> &mut Self {
        for l in text.lines() {
            self.lines.push(Line::Comment(l.to_string()));
        }
        self
    }

    /// `key=value` with `value` taken literally (specifiers escaped).
    pub fn text(&mut self, key: &str, value: &str) -> &mut Self {
        self.push(key, Value::Text(value.to_string()))
    }

    /// `key=yes|no`.
    pub fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.push(key, Value::Raw(if value { "yes" } else { "no" }.into()))
    }

    /// `key=value` written as is: for directive syntax and intended specifiers.
    pub fn raw(&mut self, key: &str, value: &str) -> &mut Self {
        self.push(key, Value::Raw(value.to_string()))
    }

    /// A command line (`ExecStart=` and friends), each argument quoted.
    pub fn exec<S: AsRef<str>>(&mut self, key: &str, argv: &[S]) -> &mut Self {
        self.exec_with_prefix(key, "", argv)
    }

    /// A command line with systemd's prefix flags, e.g. `-` (ignore failure) or `+`
    /// (full privileges).
    pub fn exec_with_prefix<S: AsRef<str>>(&mut self, key: &str, prefix: &str, argv: &[S]) -> &mut Self {
        let argv = argv.iter().map(|a| a.as_ref().to_string()).collect();
        self.push(
            key,
            Value::Exec {
                prefix: prefix.to_string(),
                argv,
            },
        )
    }

    /// `Environment="NAME=value"`.
    pub fn env(&mut self, name: &str, value: &str) -> &mut Self {
        self.push(
            "Environment",
            Value::Env {
                name: name.to_string(),
                value: value.to_string(),
            },
        )
    }

    /// `key=a b c`, each item escaped as text and refused if it holds whitespace.
    pub fn list<S: AsRef<str>>(&mut self, key: &str, items: &[S]) -> &mut Self {
        let items = items.iter().map(|a| a.as_ref().to_string()).collect();
        self.push(key, Value::List(items))
    }
}

/// A unit file: ordered sections, rendered in insertion order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitFile {
    header: Vec<String>,
    sections: Vec<Section>,
}

impl UnitFile {
    pub fn new() -> Self {
        Self::default()
    }

    /// A comment at the top of the file (e.g. "generated by cohort; do not edit").
    pub fn header_comment(&mut self, text: &str) -> &mut Self {
        self.header.extend(text.lines().map(str::to_string));
        self
    }

    /// The section `name`, created at the end if missing.
    pub fn section(&mut self, name: &str) -> &mut Section {
        if let Some(i) = self.sections.iter().position(|s| s.name == name) {
            return &mut self.sections[i];
        }
        self.sections.push(Section {
            name: name.to_string(),
            lines: Vec::new(),
        });
        self.sections.last_mut().expect("just pushed")
    }

    /// The file's text, or the first value that cannot be written safely.
    pub fn render(&self) -> Result<String, UnitError> {
        let mut out = String::new();
        for h in &self.header {
            let _ = writeln!(out, "# {h}");
        }
        for (i, s) in self.sections.iter().enumerate() {
            if i > 0 || !self.header.is_empty() {
                out.push('\n');
            }
            if s.name.is_empty() || s.name.contains(['[', ']', '\n']) {
                return Err(UnitError::BadSection(s.name.clone()));
            }
            let _ = writeln!(out, "[{}]", s.name);
            for line in &s.lines {
                match line {
                    Line::Comment(c) => {
                        let _ = writeln!(out, "# {c}");
                    }
                    Line::Entry { key, value } => {
                        check_key(key)?;
                        let v = render_value(key, value)?;
                        check_line(key, &v)?;
                        let _ = writeln!(out, "{key}={v}");
                    }
                }
            }
        }
        Ok(out)
    }
}

fn check_key(key: &str) -> Result<(), UnitError> {
    let ok = !key.is_empty()
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && key.starts_with(|c: char| c.is_ascii_alphabetic());
    if ok {
        Ok(())
    } else {
        Err(UnitError::BadKey(key.to_string()))
    }
}

fn check_line(key: &str, v: &str) -> Result<(), UnitError> {
    if v.contains(['\n', '\r', '\0']) {
        return Err(UnitError::Newline { key: key.to_string() });
    }
    if v.ends_with('\\') {
        return Err(UnitError::TrailingBackslash { key: key.to_string() });
    }
    Ok(())
}

/// `%` introduces a specifier in nearly every setting.
fn escape_specifiers(s: &str) -> String {
    s.replace('%', "%%")
}

/// One double-quoted word with C escapes; `$` doubled when `dollar` (command lines).
fn quote_word(s: &str, dollar: bool) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '%' => out.push_str("%%"),
            '$' if dollar => out.push_str("$$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_value(key: &str, value: &Value) -> Result<String, UnitError> {
    Ok(match value {
        Value::Text(t) => {
            check_line(key, t)?;
            escape_specifiers(t)
        }
        Value::Raw(r) => r.clone(),
        Value::Exec { prefix, argv } => {
            let Some((prog, args)) = argv.split_first() else {
                return Err(UnitError::EmptyCommand { key: key.to_string() });
            };
            // The program is quoted too, with the prefix flags outside the quotes.
            let mut s = format!("{prefix}{}", quote_word(prog, true));
            for a in args {
                s.push(' ');
                s.push_str(&quote_word(a, true));
            }
            s
        }
        Value::Env { name, value } => {
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                return Err(UnitError::BadEnvName {
                    key: key.to_string(),
                    name: name.clone(),
                });
            }
            quote_word(&format!("{name}={value}"), false)
        }
        Value::List(items) => {
            let mut words = Vec::with_capacity(items.len());
            for it in items {
                if it.is_empty() || it.contains(char::is_whitespace) {
                    return Err(UnitError::SpaceInListItem {
                        key: key.to_string(),
                        item: it.clone(),
                    });
                }
                words.push(escape_specifiers(it));
            }
            words.join(" ")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_sections_in_order_with_escaping() {
        let mut u = UnitFile::new();
        u.header_comment("generated by cohort");
        u.section("Unit")
            .text("Description", "cohort 100% busy")
            .raw("After", "network-online.target");
        u.section("Service")
            .raw("Type", "notify")
            .exec("ExecStart", &["/opt/my tools/cohort", "serve", "--price=$5", "a\"b"])
            .exec_with_prefix("ExecStartPre", "-", &["/bin/true"])
            .env("COHORT_REPO", "/srv/repo with space")
            .list("ReadWritePaths", &["/var/lib/cohort", "/srv/100%"])
            .bool("NoNewPrivileges", true);
        u.section("Install").raw("WantedBy", "multi-user.target");
        let text = u.render().unwrap();
        assert_eq!(
            text,
            "# generated by cohort\n\
             \n[Unit]\n\
             Description=cohort 100%% busy\n\
             After=network-online.target\n\
             \n[Service]\n\
             Type=notify\n\
             ExecStart=\"/opt/my tools/cohort\" \"serve\" \"--price=$$5\" \"a\\\"b\"\n\
             ExecStartPre=-\"/bin/true\"\n\
             Environment=\"COHORT_REPO=/srv/repo with space\"\n\
             ReadWritePaths=/var/lib/cohort /srv/100%%\n\
             NoNewPrivileges=yes\n\
             \n[Install]\n\
             WantedBy=multi-user.target\n"
        );
    }

    #[test]
    fn section_is_reused() {
        let mut u = UnitFile::new();
        u.section("Service").raw("Type", "simple");
        u.section("Unit").text("Description", "x");
        u.section("Service").raw("Restart", "on-failure");
        let t = u.render().unwrap();
        assert_eq!(t.matches("[Service]").count(), 1);
        assert!(t.contains("[Service]\nType=simple\nRestart=on-failure\n"));
    }

    #[test]
    fn refuses_what_would_change_the_file() {
        let mut u = UnitFile::new();
        u.section("Unit").text("Description", "two\nlines");
        assert!(matches!(u.render(), Err(UnitError::Newline { .. })));

        let mut u = UnitFile::new();
        u.section("Unit").raw("Description", "ends with \\");
        assert!(matches!(u.render(), Err(UnitError::TrailingBackslash { .. })));

        let mut u = UnitFile::new();
        u.section("Unit").raw("Bad Key", "x");
        assert_eq!(u.render(), Err(UnitError::BadKey("Bad Key".into())));

        let mut u = UnitFile::new();
        u.section("Service").exec::<&str>("ExecStart", &[]);
        assert!(matches!(u.render(), Err(UnitError::EmptyCommand { .. })));

        let mut u = UnitFile::new();
        u.section("Service").env("1BAD", "x");
        assert!(matches!(u.render(), Err(UnitError::BadEnvName { .. })));

        let mut u = UnitFile::new();
        u.section("Service").list("ReadWritePaths", &["/a b"]);
        assert!(matches!(u.render(), Err(UnitError::SpaceInListItem { .. })));
    }

    #[test]
    fn exec_newlines_are_escaped_not_refused() {
        let mut u = UnitFile::new();
        u.section("Service").exec("ExecStart", &["/bin/echo", "a\nb\\"]);
        let t = u.render().unwrap();
        assert!(t.contains("ExecStart=\"/bin/echo\" \"a\\nb\\\\\"\n"), "{t}");
    }
}
