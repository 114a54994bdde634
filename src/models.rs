//! Checks made against the model endpoint before any task starts: a wrong
//! or empty model name otherwise makes every run go silently bad.

use std::time::Duration;

use crate::secret::Secret;

pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("the model name is empty; pass --model or set it in cohort.toml")]
    Empty,
    #[error("model {model:?} is not offered by {base}; it offers: {offered}. Pass --model with one of them")]
    NotOffered {
        model: String,
        base: String,
        offered: String,
    },
    #[error("{base} refused the API key (HTTP {status}); check OPENAI_API_KEY")]
    KeyRefused { base: String, status: u16 },
    #[error("cannot reach {base}: {message}; check --base-url and that the server is running")]
    Unreachable { base: String, message: String },
}

fn is_loopback(base: &str) -> bool {
    reqwest::Url::parse(base)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .is_some_and(|h| matches!(h.as_str(), "127.0.0.1" | "localhost" | "[::1]" | "::1"))
}

/// Lists the endpoint's models and checks `model` is among them. Servers
/// that do not list models (or list none) are taken at their word.
pub async fn check_model(model: &str, base_url: Option<&str>, key: &Secret) -> Result<(), ModelError> {
    if model.trim().is_empty() {
        return Err(ModelError::Empty);
    }
    let base = base_url.unwrap_or(OPENAI_BASE_URL).trim_end_matches('/').to_string();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(30));
    if is_loopback(&base) {
        builder = builder.no_proxy(); // a proxy from the environment must not capture a local server
    }
    let unreachable = |e: reqwest::Error| ModelError::Unreachable {
        base: base.clone(),
        message: e.without_url().to_string(),
    };
    let client = builder.build().map_err(unreachable)?;
    let resp = client
        .get(format!("{base}/models"))
        .bearer_auth(key.expose())
        .send()
        .await
        .map_err(unreachable)?;
    let status = resp.status().as_u16();
    if status == 401 || status == 403 {
        return Err(ModelError::KeyRefused { base, status });
    }
    if !resp.status().is_success() {
        tracing::warn!("{base}/models answered HTTP {status}; not checking the model name");
        return Ok(());
    }
    let bytes = resp.bytes().await.unwrap_or_default();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let ids: Vec<&str> = body["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str())
        .collect();
    if ids.is_empty() || ids.contains(&model) {
        return Ok(());
    }
    let mut offered: Vec<&str> = ids.into_iter().take(12).collect();
    offered.sort_unstable();
    Err(ModelError::NotOffered {
        model: model.into(),
        base,
        offered: offered.join(", "),
    })
}
