//! The worker token: `cohort-worker.<certificate fingerprint>.<secret>`. The fingerprint
//! tells a worker which controller to trust; the secret tells the controller the worker is
//! one of its run's. It is not the API key, and it dies with the controller.

use base64::Engine as _;
use rand::RngCore;

use super::RemoteError;
use crate::secret::Secret;

const PREFIX: &str = "cohort-worker";

/// A parsed worker token.
#[derive(Clone)]
pub struct WorkerToken {
    pub fingerprint: String,
    secret: Secret,
}

impl std::fmt::Debug for WorkerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WorkerToken({}…, ***)",
            &self.fingerprint[..12.min(self.fingerprint.len())]
        )
    }
}

impl WorkerToken {
    /// A new token for the controller whose certificate has `fingerprint`.
    pub fn generate(fingerprint: &str) -> WorkerToken {
        let mut raw = [0u8; 32];
        rand::rng().fill_bytes(&mut raw);
        WorkerToken {
            fingerprint: fingerprint.to_string(),
            secret: Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)),
        }
    }

    pub fn parse(text: &str) -> Result<WorkerToken, RemoteError> {
        let bad = || {
            RemoteError::Token(
                "COHORT_WORKER_TOKEN is not a cohort worker token (cohort-worker.<fingerprint>.<secret>); \
                 copy it again from the controller's run directory (worker-token)"
                    .into(),
            )
        };
        let mut parts = text.trim().split('.');
        let (Some(PREFIX), Some(fp), Some(secret), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let hex = fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex || secret.len() < 32 {
            return Err(bad());
        }
        Ok(WorkerToken {
            fingerprint: fp.to_ascii_lowercase(),
            secret: Secret::new(secret),
        })
    }

    /// The whole token, for the one place that hands it to a worker (a podman secret, a
    /// Kubernetes Secret, the run directory's 0600 file).
    pub fn to_secret(&self) -> Secret {
        Secret::new(format!("{PREFIX}.{}.{}", self.fingerprint, self.secret.expose()))
    }

    /// What a worker sends as its bearer token.
    pub fn bearer(&self) -> &str {
        self.secret.expose()
    }

    /// Whether `presented` is this token's secret, compared in constant time.
    pub fn accepts(&self, presented: &str) -> bool {
        let (a, b) = (self.secret.expose().as_bytes(), presented.as_bytes());
        a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_and_only_its_secret_is_accepted() {
        let fp = "ab".repeat(32);
        let t = WorkerToken::generate(&fp);
        let text = t.to_secret().expose().to_string();
        let back = WorkerToken::parse(&text).unwrap();
        assert_eq!(back.fingerprint, fp);
        assert!(t.accepts(back.bearer()));
        assert!(!t.accepts(WorkerToken::generate(&fp).bearer()));
        assert!(!t.accepts(""));
        assert!(!format!("{t:?}").contains(t.bearer()));
        for bad in [
            "",
            "cohort-worker.x.y",
            &format!("other.{fp}.{}", "s".repeat(43)),
            &format!("{text}.more"),
        ] {
            assert!(WorkerToken::parse(bad).is_err(), "{bad}");
        }
    }
}
