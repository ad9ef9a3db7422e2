//! Feeds arbitrary bytes to the auth body parser and the JWT verifier, the
//! way a hostile client sends them in its op-7 auth frame: as the body, and
//! as the body's token. Neither may panic; a token it accepts must have
//! been signed with the configured secret (random input never is).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use pushcluster_api::config::JwtConfig;
use pushcluster_logic::auth::{AuthBody, JwtVerifier};

const SECRET: &str = "fuzzing-secret-of-at-least-32-bytes!";

fn verifier() -> &'static JwtVerifier {
    static VERIFIER: OnceLock<JwtVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        JwtVerifier::new(&JwtConfig {
            hs256_secret: Some(SECRET.into()),
            ..JwtConfig::default()
        })
        .expect("an HS256 verifier")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(body) = AuthBody::parse(data) {
        let _ = verifier().verify(body);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let body = AuthBody {
            token: text.to_string(),
            ..AuthBody::default()
        };
        assert!(
            verifier().verify(body).is_err(),
            "an unsigned input was accepted as a token"
        );
    }
});
