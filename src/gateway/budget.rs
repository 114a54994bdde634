//! Budgets: how much a task or a run may spend, in tokens or in dollars.
//!
//! The config form is `budget = { task = "300k", run = "5M" }`; a value is a
//! token count (`300000`, `300k`, `1.5M`) or dollars (`"$2.50"`, `"$1k"`).
//! Tokens spent are input plus output tokens (cached input is part of input);
//! dollars are priced with `[agent] price`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

use super::Usage;
use crate::config::Price;

/// A limit, or an amount spent in the same unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    Tokens(u64),
    /// US dollars.
    Dollars(f64),
}

/// Which budget a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BudgetScope {
    Task,
    Run,
}

impl fmt::Display for BudgetScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BudgetScope::Task => "task",
            BudgetScope::Run => "run",
        })
    }
}

/// `[run] budget = { task = "300k", run = "5M" }`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    pub task: Option<Budget>,
    pub run: Option<Budget>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid budget {value:?}: {reason}; write a token count like \"300k\" or \"5M\", or dollars like \"$2.50\"")]
pub struct BudgetError {
    pub value: String,
    pub reason: &'static str,
}

impl Budget {
    /// Parses `300000`, `300k`, `1.5M`, `$2.50`, `$1k` (underscores allowed as in `300_000`).
    pub fn parse(text: &str) -> Result<Budget, BudgetError> {
        let bad = |reason| BudgetError {
            value: text.to_string(),
            reason,
        };
        let s = text.trim().replace('_', "");
        let (dollars, s) = match s.strip_prefix('$') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, s.as_str()),
        };
        let (number, factor) = match s.char_indices().last() {
            Some((i, 'k' | 'K')) => (&s[..i], 1e3),
            Some((i, 'M')) => (&s[..i], 1e6),
            Some((_, 'm')) => return Err(bad("write millions as M (m could mean milli)")),
            Some(_) => (s, 1.0),
            None => return Err(bad("it is empty")),
        };
        if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(bad("it is not a number"));
        }
        let n: f64 = number.parse().map_err(|_| bad("it is not a number"))?;
        let value = n * factor;
        if !value.is_finite() || value <= 0.0 {
            return Err(bad("it must be more than zero"));
        }
        if dollars {
            return Ok(Budget::Dollars(value));
        }
        if value.fract() != 0.0 {
            return Err(bad("a token count is a whole number"));
        }
        if value > u64::MAX as f64 {
            return Err(bad("it is too large"));
        }
        Ok(Budget::Tokens(value as u64))
    }

    /// What `usage` spent, in this budget's unit. `None` for dollars without a price
    /// (the gateway refuses that configuration at start).
    pub fn spent(&self, usage: &Usage, price: Option<&Price>) -> Option<Budget> {
        match self {
            Budget::Tokens(_) => Some(Budget::Tokens(usage.input.saturating_add(usage.output))),
            Budget::Dollars(_) => price.map(|p| Budget::Dollars(p.cost(usage.input, usage.cached_input, usage.output))),
        }
    }

    /// Whether `spent` (from [`Budget::spent`]) has reached this limit.
    pub fn is_reached_by(&self, spent: &Budget) -> bool {
        match (self, spent) {
            (Budget::Tokens(limit), Budget::Tokens(used)) => used >= limit,
            (Budget::Dollars(limit), Budget::Dollars(used)) => used >= limit,
            _ => false,
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Tokens(n) => write!(f, "{n} tokens"),
            // Cents when that is exact ("$2.50"), else up to four decimals ("$0.0021").
            Budget::Dollars(d) if ((d * 100.0).round() - d * 100.0).abs() < 1e-9 => write!(f, "${d:.2}"),
            Budget::Dollars(d) => {
                let s = format!("{d:.4}");
                write!(f, "${}", s.trim_end_matches('0').trim_end_matches('.'))
            }
        }
    }
}

impl FromStr for Budget {
    type Err = BudgetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Budget::parse(s)
    }
}

impl<'de> Deserialize<'de> for Budget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A string ("300k", "$2.50") or a bare token count (300000).
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Budget::parse(&n.to_string()),
            Raw::Text(s) => Budget::parse(&s),
        }
        .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tokens_and_dollars() {
        assert_eq!(Budget::parse("300k"), Ok(Budget::Tokens(300_000)));
        assert_eq!(Budget::parse("5M"), Ok(Budget::Tokens(5_000_000)));
        assert_eq!(Budget::parse("1.5M"), Ok(Budget::Tokens(1_500_000)));
        assert_eq!(Budget::parse(" 300_000 "), Ok(Budget::Tokens(300_000)));
        assert_eq!(Budget::parse("$2.50"), Ok(Budget::Dollars(2.5)));
        assert_eq!(Budget::parse("$1k"), Ok(Budget::Dollars(1000.0)));
        assert_eq!(Budget::Dollars(2.5).to_string(), "$2.50");
        assert_eq!(Budget::Dollars(0.002).to_string(), "$0.002");
        assert_eq!(Budget::Dollars(0.0021000000000000003).to_string(), "$0.0021");
        assert_eq!(Budget::Tokens(300_000).to_string(), "300000 tokens");
    }

    #[test]
    fn bad_values_say_why() {
        for (text, why) in [
            ("", "it is empty"),
            ("30x", "it is not a number"),
            ("-5k", "it is not a number"),
            ("0", "it must be more than zero"),
            ("1.5", "a token count is a whole number"),
            ("5m", "write millions as M (m could mean milli)"),
            ("$", "it is empty"),
        ] {
            let e = Budget::parse(text).unwrap_err();
            assert_eq!(e.reason, why, "{text:?}");
        }
        let msg = Budget::parse("lots").unwrap_err().to_string();
        assert!(msg.contains("\"lots\"") && msg.contains("\"$2.50\""), "{msg}");
    }

    #[test]
    fn the_config_form_deserializes() {
        #[derive(Deserialize)]
        struct Run {
            budget: BudgetSpec,
        }
        let r: Run = toml::from_str("budget = { task = \"300k\", run = \"$5\" }").unwrap();
        assert_eq!(r.budget.task, Some(Budget::Tokens(300_000)));
        assert_eq!(r.budget.run, Some(Budget::Dollars(5.0)));
        let r: Run = toml::from_str("budget = { task = 1000 }").unwrap();
        assert_eq!(r.budget.task, Some(Budget::Tokens(1000)));
        let e = toml::from_str::<Run>("budget = { task = \"lots\" }")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("invalid budget \"lots\""), "{e}");
        assert!(toml::from_str::<Run>("budget = { tasks = \"1k\" }").is_err());
    }

    #[test]
    fn spending_in_each_unit() {
        let u = Usage {
            input: 1_000_000,
            cached_input: 500_000,
            output: 100_000,
            requests: 3,
        };
        let price = Price {
            input: 2.0,
            output: 10.0,
            cached_input: Some(0.5),
        };
        let spent = Budget::Tokens(1).spent(&u, None).unwrap();
        assert_eq!(spent, Budget::Tokens(1_100_000));
        assert!(Budget::Tokens(1_100_000).is_reached_by(&spent));
        assert!(!Budget::Tokens(1_100_001).is_reached_by(&spent));
        let spent = Budget::Dollars(1.0).spent(&u, Some(&price)).unwrap();
        assert_eq!(spent, Budget::Dollars(2.25));
        assert!(Budget::Dollars(2.25).is_reached_by(&spent));
        assert!(Budget::Dollars(1.0).spent(&u, None).is_none());
    }
}
