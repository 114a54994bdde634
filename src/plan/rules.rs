//! The embedded rule-based planner: Markdown or plain text in, one task per
//! list item (or per paragraph when the document has no list) out. No model.
//!
//! Rules, in document order:
//! - list items (`-`, `*`, `+`, `1.`, `1)`) are tasks; checked checkboxes
//!   (`[x]`) are done and skipped, with everything nested under them;
//! - an item nested under another becomes part of its parent's task;
//! - continuation lines are folded into their item, and so is a paragraph
//!   indented under an item after a blank line;
//! - the nearest heading above an item is kept as context: `Heading: item`;
//! - a document with no list at all gives one task per paragraph;
//! - code fences, tables, HTML comments, rules and front matter (a leading
//!   `---` block with its closing `---` or `...`) are skipped;
//! - whitespace is collapsed and duplicates dropped.

use super::{Plan, PlanError};

pub const DEFAULT_TEMPLATE: &str = "You are working in a checkout of a git repository. Complete this task:\n\n\
{task}\n\n\
Change the files of this repository directly. Keep the change focused on the task and leave unrelated \
code as it is. You may commit your work with git; anything you leave uncommitted is committed for you. \
When you are done, reply with a short summary of what you changed.\n";

#[derive(Debug)]
struct Item {
    indent: usize,
    text: String,
    checked: bool,
    heading: Option<String>,
    children: Vec<String>,
    /// Indent of the last nested item, to tell whose paragraph an indented one is.
    child_indent: usize,
}

/// Where a line of text that is not a list item goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cont {
    /// Not in a list item: a paragraph of its own.
    None,
    /// The open top-level item's text.
    Text,
    /// Its last nested item.
    Child,
    /// A checked-off item (or one nested under it): dropped with it.
    Skip,
}

/// A list marker at the start of `line` (after indentation): returns the
/// content after the marker.
fn list_marker(line: &str) -> Option<&str> {
    let b = line.as_bytes();
    if b.len() >= 2 && matches!(b[0], b'-' | b'*' | b'+') && (b[1] == b' ' || b[1] == b'\t') {
        return Some(&line[2..]);
    }
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if (1..=9).contains(&digits) && b.len() > digits + 1 && matches!(b[digits], b'.' | b')') && b[digits + 1] == b' ' {
        return Some(&line[digits + 2..]);
    }
    None
}

/// Splits off a checkbox: `Some(true)` for `[x]`, `Some(false)` for `[ ]`.
fn checkbox(text: &str) -> (Option<bool>, &str) {
    let t = text.trim_start();
    for (mark, done) in [("[ ]", false), ("[x]", true), ("[X]", true)] {
        if let Some(rest) = t.strip_prefix(mark) {
            if rest.is_empty() || rest.starts_with([' ', '\t']) {
                return (Some(done), rest);
            }
        }
    }
    (None, text)
}

fn heading(line: &str) -> Option<&str> {
    let hashes = line.bytes().take_while(|&c| c == b'#').count();
    if (1..=6).contains(&hashes) && line[hashes..].starts_with([' ', '\t']) {
        Some(line[hashes..].trim().trim_end_matches('#').trim())
    } else {
        None
    }
}

fn is_rule(t: &str) -> bool {
    let c: Vec<char> = t.chars().filter(|c| !c.is_whitespace()).collect();
    c.len() >= 3 && (c.iter().all(|&x| x == '-') || c.iter().all(|&x| x == '*') || c.iter().all(|&x| x == '_'))
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn indent_of(line: &str) -> usize {
    line.chars()
        .take_while(|c| c.is_whitespace())
        .map(|c| if c == '\t' { 4 } else { 1 })
        .sum()
}

pub fn plan(document: &str, path: &str) -> Result<Plan, PlanError> {
    let mut items: Vec<Item> = Vec::new();
    let mut paragraphs: Vec<String> = Vec::new();
    let mut para = String::new();
    let mut current_heading: Option<String> = None;
    let mut in_fence = false;
    let mut in_comment = false;
    // Index into `items` of the open top-level item, and where a following
    // text line goes (lazy continuation lines continue the last item line).
    let mut open: Option<usize> = None;
    let mut cont = Cont::None;
    // A blank line ended an item: an indented paragraph next still belongs to it.
    let mut after_item_blank = false;
    // Indent of a checked-off nested item: what is nested under it is done too.
    let mut skip_below: Option<usize> = None;

    let lines: Vec<&str> = document.lines().collect();
    // Front matter only when it is closed: a lone leading `---` is a rule,
    // and swallowing the whole document as front matter would lose every task.
    let mut start = 0;
    if lines.first().map(|l| l.trim_end()) == Some("---") {
        if let Some(end) = lines[1..].iter().position(|l| matches!(l.trim_end(), "---" | "...")) {
            start = end + 2;
        }
    }
    let flush = |para: &mut String, paragraphs: &mut Vec<String>| {
        if !para.trim().is_empty() {
            paragraphs.push(collapse(para));
        }
        para.clear();
    };
    for raw in &lines[start..] {
        let line = raw.trim_end();
        let t = line.trim_start();
        if t.starts_with("```") || t.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence {
            continue;
        }
        if in_comment || t.starts_with("<!--") {
            in_comment = !t.contains("-->");
            continue;
        }
        if t.is_empty() {
            flush(&mut para, &mut paragraphs);
            after_item_blank |= cont != Cont::None;
            cont = Cont::None;
            continue;
        }
        if let Some(h) = heading(t) {
            flush(&mut para, &mut paragraphs);
            current_heading = Some(collapse(h)).filter(|h| !h.is_empty());
            open = None;
            cont = Cont::None;
            after_item_blank = false;
            continue;
        }
        if is_rule(t) || t.starts_with('|') {
            flush(&mut para, &mut paragraphs);
            cont = Cont::None;
            after_item_blank = false;
            continue;
        }
        let t = t.trim_start_matches('>').trim_start();
        if let Some(rest) = list_marker(t) {
            flush(&mut para, &mut paragraphs);
            let indent = indent_of(line);
            let (cb, text) = checkbox(rest);
            let text = collapse(text);
            after_item_blank = false;
            match open {
                Some(i) if indent > items[i].indent => {
                    // Nested: part of the parent task, unless checked off.
                    if skip_below.is_some_and(|k| indent > k) {
                        cont = Cont::Skip;
                        continue;
                    }
                    skip_below = None;
                    if cb == Some(true) {
                        skip_below = Some(indent);
                        cont = Cont::Skip;
                    } else if !text.is_empty() {
                        items[i].children.push(text);
                        items[i].child_indent = indent;
                        cont = Cont::Child;
                    } else {
                        // An empty nested item: lines after it go where they did before it.
                        cont = if items[i].children.is_empty() {
                            Cont::Text
                        } else {
                            Cont::Child
                        };
                    }
                }
                _ => {
                    skip_below = None;
                    items.push(Item {
                        indent,
                        text,
                        checked: cb == Some(true),
                        heading: current_heading.clone(),
                        children: Vec::new(),
                        child_indent: 0,
                    });
                    open = Some(items.len() - 1);
                    cont = Cont::Text;
                }
            }
            continue;
        }
        if cont == Cont::None && after_item_blank {
            // A paragraph after a blank line: part of the open item when it is
            // indented under it (whose part, its indent says), else not a task.
            let indent = indent_of(line);
            if let Some(i) = open.filter(|&i| indent > items[i].indent) {
                cont = if skip_below.is_some_and(|k| indent > k) {
                    Cont::Skip
                } else if !items[i].children.is_empty() && indent > items[i].child_indent {
                    Cont::Child
                } else {
                    Cont::Text
                };
            }
        }
        if cont != Cont::None {
            // A continuation line: fold it into its item, or drop it with a checked one.
            let item = &mut items[open.expect("an item is open")];
            let target = match cont {
                Cont::Text => &mut item.text,
                Cont::Child => item.children.last_mut().expect("a nested item"),
                _ => continue,
            };
            target.push(' ');
            target.push_str(&collapse(t));
            continue;
        }
        after_item_blank = false;
        para.push(' ');
        para.push_str(t);
    }
    flush(&mut para, &mut paragraphs);

    let any_list = !items.is_empty();
    let raw_tasks: Vec<String> = if any_list {
        items
            .into_iter()
            .filter(|i| !i.checked && !i.text.is_empty())
            .map(|i| {
                let mut text = i.text;
                if !i.children.is_empty() {
                    text = format!("{}: {}", text.trim_end_matches(':'), i.children.join("; "));
                }
                match i.heading {
                    Some(h) => format!("{h}: {text}"),
                    None => text,
                }
            })
            .collect()
    } else {
        paragraphs
    };
    let mut seen = std::collections::HashSet::new();
    let tasks: Vec<String> = raw_tasks
        .into_iter()
        .map(|t| collapse(&t))
        .filter(|t| !t.is_empty() && seen.insert(t.to_lowercase()))
        .collect();
    if tasks.is_empty() {
        return Err(PlanError::NoTasks { path: path.into() });
    }
    let plan = Plan {
        tasks,
        template: DEFAULT_TEMPLATE.into(),
    };
    plan.validate()?;
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tasks(doc: &str) -> Vec<String> {
        plan(doc, "t.md").unwrap().tasks
    }

    #[test]
    fn bullets_numbers_and_checkboxes() {
        let doc = "- one\n* two\n+ three\n1. four\n2) five\n- [ ] six\n- [x] seven\n- [X] eight\n";
        assert_eq!(tasks(doc), ["one", "two", "three", "four", "five", "six"]);
    }

    #[test]
    fn nested_items_join_their_parent_and_checked_parents_drop_children() {
        let doc = "- Add a CLI:\n  - parse flags\n  - [x] done already\n    1. print help\n- [x] old\n  - child of old\n- last\n";
        assert_eq!(tasks(doc), ["Add a CLI: parse flags", "last"]);
    }

    #[test]
    fn headings_give_context_and_continuations_fold() {
        let doc = "# Backend\n\nIntro text that is not a task.\n\n- add caching\n  to the API layer\n\
                   lazy continuation\n\n## Frontend ##\n- dark   mode\n";
        assert_eq!(
            tasks(doc),
            [
                "Backend: add caching to the API layer lazy continuation",
                "Frontend: dark mode"
            ]
        );
    }

    #[test]
    fn paragraphs_without_lists_are_tasks() {
        let doc = "Fix the login bug\nthat happens on Safari.\n\nWrite docs for the API.\n\n\nfix the login bug that happens on safari.\n";
        assert_eq!(
            tasks(doc),
            ["Fix the login bug that happens on Safari.", "Write docs for the API."]
        );
    }

    #[test]
    fn skips_fences_tables_comments_rules_and_front_matter() {
        let doc = "---\ntitle: x\n---\n- real\n```\n- not an item\n```\n| a | b |\n<!-- - hidden\n-->\n***\n- real\n- second\n";
        assert_eq!(tasks(doc), ["real", "second"]);
    }

    #[test]
    fn indented_paragraphs_after_a_blank_line_stay_in_their_item() {
        let doc = "- task\n\n  more detail\n  on two lines\n- next\n\nNot indented: not part of the list.\n";
        assert_eq!(tasks(doc), ["task more detail on two lines", "next"]);
        let doc = "1. parent\n   - child\n\n     child detail\n\n   parent detail\n2. second\n";
        assert_eq!(tasks(doc), ["parent parent detail: child child detail", "second"]);
    }

    #[test]
    fn continuation_lines_of_checked_items_are_skipped_with_them() {
        let doc = "- parent\n  - [x] done\n    more words\n  - open\n- next\n";
        assert_eq!(tasks(doc), ["parent: open", "next"]);
        let doc = "- parent\n  - [x] done\n\n    about done\n\n  about parent\n";
        assert_eq!(tasks(doc), ["parent about parent"]);
    }

    #[test]
    fn a_leading_rule_without_a_closing_line_is_not_front_matter() {
        assert_eq!(tasks("---\n- one\n- two\n"), ["one", "two"]);
        assert_eq!(tasks("---\nFix the build.\n"), ["Fix the build."]);
        assert_eq!(tasks("---\ntitle: x\n...\n- only\n"), ["only"]);
    }

    #[test]
    fn no_tasks_is_an_error() {
        assert!(matches!(
            plan("- [x] done\n- [X] also\n", "t.md"),
            Err(PlanError::NoTasks { .. })
        ));
        assert!(matches!(
            plan("# Only a heading\n", "t.md"),
            Err(PlanError::NoTasks { .. })
        ));
    }

    #[test]
    fn template_has_placeholder() {
        let p = plan("- x\n", "t.md").unwrap();
        assert!(p.template.contains("{task}"));
        assert!(Plan::prompt_for(&p.template, "do it").contains("do it"));
    }
}
