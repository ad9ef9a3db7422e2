//! The bearer tokens of the push and online API (`logic.api`). Token files
//! hold one token per line and are re-read in the background when they
//! change (looked at every few seconds), so a rotated Kubernetes Secret
//! applies without a restart and checking a request never reads a file.

use std::sync::Arc;
use std::time::Duration;

use pushcluster_api::config::ApiConfig;
use pushcluster_files::Reloading;
use subtle::ConstantTimeEq;

use crate::auth::AuthSetupError;

/// How often token files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);
/// Shorter tokens in files are ignored (a stray blank or comment line).
const MIN_TOKEN: usize = 16;

pub struct ApiTokens {
    required: bool,
    inline: Vec<String>,
    from_files: Arc<Reloading<Vec<String>>>,
}

impl ApiTokens {
    pub fn new(config: &ApiConfig) -> Result<ApiTokens, AuthSetupError> {
        let files = config.token_files.clone();
        let from_files =
            Reloading::start("API tokens", files.clone(), RELOAD_INTERVAL, move || {
                read_files(&files)
            })?;
        Ok(ApiTokens {
            required: config.has_tokens(),
            inline: config.tokens.iter().map(|t| t.trim().to_string()).collect(),
            from_files,
        })
    }

    /// Whether requests need a token at all (none configured: open API).
    pub fn required(&self) -> bool {
        self.required
    }

    /// Whether `presented` is one of the tokens.
    pub fn accepts(&self, presented: &str) -> bool {
        if self.inline.iter().any(|t| same(t, presented)) {
            return true;
        }
        self.from_files.current().iter().any(|t| same(t, presented))
    }
}

/// Compares in time independent of where the strings differ (`subtle`;
/// only the length may show).
fn same(expected: &str, presented: &str) -> bool {
    expected.as_bytes().ct_eq(presented.as_bytes()).into()
}

fn read_files(paths: &[String]) -> Result<Vec<String>, AuthSetupError> {
    let mut tokens = Vec::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|source| AuthSetupError::Read {
            path: path.clone(),
            source,
        })?;
        tokens.extend(
            text.lines()
                .map(str::trim)
                .filter(|line| line.len() >= MIN_TOKEN)
                .map(String::from),
        );
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_and_file_tokens_are_accepted_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("tokens");
        std::fs::write(&file, "file-token-0123456789\n\nshort\n").expect("write");
        let tokens = ApiTokens::new(&ApiConfig {
            tokens: vec!["inline-token-0123456789".into()],
            token_files: vec![file.display().to_string()],
            allow_unauthenticated: false,
        })
        .expect("tokens");
        assert!(tokens.required());
        assert!(tokens.accepts("inline-token-0123456789"));
        assert!(tokens.accepts("file-token-0123456789"));
        for wrong in [
            "",
            "short",
            "inline-token-012345678",
            "inline-token-01234567890",
        ] {
            assert!(!tokens.accepts(wrong), "{wrong:?}");
        }
    }

    #[test]
    fn a_missing_token_file_is_a_setup_error() {
        let result = ApiTokens::new(&ApiConfig {
            token_files: vec!["/nonexistent/tokens".into()],
            ..ApiConfig::default()
        });
        assert!(matches!(result, Err(AuthSetupError::Read { .. })));
    }
}
