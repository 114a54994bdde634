//! An image reference to push to: `HOST[:PORT]/NAME[:TAG]`.
//!
//! The registry host is always named: a bare `name:tag` would leave the choice of registry to
//! a default, and a push must not go somewhere the user did not say.

use std::fmt;

/// `registry/repository:tag`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`, as the URL's authority.
    pub registry: String,
    /// The repository path in the registry (`team/cohort`).
    pub repository: String,
    pub tag: String,
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}:{}", self.registry, self.repository, self.tag)
    }
}

impl Reference {
    /// Parses `HOST[:PORT]/NAME[:TAG]` (tag `latest` when left out). The error says what is
    /// wrong in words a user can act on.
    pub fn parse(s: &str) -> Result<Reference, String> {
        if s.contains('@') {
            return Err(format!("{s:?}: push to a tag (HOST/NAME:TAG), not a digest"));
        }
        let Some((registry, rest)) = s.split_once('/') else {
            return Err(format!(
                "{s:?} names no registry: write HOST[:PORT]/NAME[:TAG], e.g. 127.0.0.1:5000/cohort:1"
            ));
        };
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(format!(
                "{s:?}: {registry:?} is not a registry host (it needs a dot, a port or to be localhost): \
                 write HOST[:PORT]/NAME[:TAG]"
            ));
        }
        if registry
            .chars()
            .any(|c| c.is_whitespace() || c == '?' || c == '#' || c == '@')
        {
            return Err(format!("{s:?}: {registry:?} is not a host[:port]"));
        }
        // A ':' after the last '/' starts the tag.
        let (repository, tag) = match rest.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, t),
            _ => (rest, "latest"),
        };
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.starts_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
                && c.ends_with(|ch: char| ch.is_ascii_lowercase() || ch.is_ascii_digit())
                && c.chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch))
        };
        if !repository.split('/').all(component_ok) {
            return Err(format!(
                "{s:?}: the name {repository:?} must be lowercase letters, digits and . _ - between slashes"
            ));
        }
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && !tag.starts_with(['.', '-'])
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !tag_ok {
            return Err(format!(
                "{s:?}: the tag {tag:?} must be letters, digits and . _ - (at most 128, not starting with . or -)"
            ));
        }
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag: tag.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let r = Reference::parse("127.0.0.1:5000/team/cohort:v1").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str(), r.tag.as_str()),
            ("127.0.0.1:5000", "team/cohort", "v1")
        );
        assert_eq!(r.to_string(), "127.0.0.1:5000/team/cohort:v1");
        let r = Reference::parse("localhost/cohort").unwrap();
        assert_eq!(r.tag, "latest");
        let r = Reference::parse("registry.example:443/cohort").unwrap();
        assert_eq!((r.repository.as_str(), r.tag.as_str()), ("cohort", "latest"));
        for bad in [
            "cohort:latest",
            "team/cohort:1",
            "127.0.0.1:5000/Cohort:1",
            "127.0.0.1:5000/cohort:",
            "127.0.0.1:5000/cohort@sha256:00",
            "127.0.0.1:5000/",
            "127.0.0.1:5000/a//b",
            "127.0.0.1:5000/cohort:-x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }
}
