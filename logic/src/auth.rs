//! Client authentication: the body of a client's op-7 auth frame
//! (PROTOCOL.md §1.4), parsed the way goim's `json.Unmarshal` does (unknown
//! fields are ignored, `null` is the zero value, a wrong type or invalid
//! JSON is an error), and the [`Authenticator`] of `logic.auth.mode` that
//! decides who the client is.

use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pushcluster_api::config::{AuthConfig, AuthMode, JwtConfig, WebhookConfig};
use pushcluster_files::Reloading;
use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct AuthBody {
    #[serde(default, deserialize_with = "null_is_default")]
    pub mid: i64,
    #[serde(default, deserialize_with = "null_is_default")]
    pub key: String,
    #[serde(default, deserialize_with = "null_is_default")]
    pub room_id: String,
    #[serde(default, deserialize_with = "null_is_default")]
    pub platform: String,
    #[serde(default, deserialize_with = "null_is_default")]
    pub accepts: Vec<i32>,
    /// pushcluster's addition: the credential of `jwt` mode (and whatever
    /// the webhook wants in `webhook` mode). Never logged.
    #[serde(default, deserialize_with = "null_is_default")]
    pub token: String,
    /// pushcluster's addition: rooms to be in besides `room_id`.
    #[serde(default, deserialize_with = "null_is_default")]
    pub rooms: Vec<String>,
}

/// pushcluster's resume fields of the auth body (`docs/recovery.md`):
/// `"positions": true` opts in to positions; `"since"` maps a room id to
/// the last position the client saw there. Read whatever the auth mode,
/// since they only concern what the client is sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ResumeFields {
    #[serde(default, deserialize_with = "null_is_default")]
    pub positions: bool,
    #[serde(default, deserialize_with = "null_is_default")]
    pub since: std::collections::HashMap<String, SincePosition>,
}

/// A position as clients send it back: the epoch as a decimal string (it
/// does not fit a JavaScript number) or a number, the offset as a number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct SincePosition {
    #[serde(deserialize_with = "u64_from_string_or_number")]
    pub epoch: u64,
    #[serde(deserialize_with = "u64_from_string_or_number")]
    pub offset: u64,
}

fn u64_from_string_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Number(u64),
        Text(String),
    }
    match Either::deserialize(deserializer)? {
        Either::Number(n) => Ok(n),
        Either::Text(text) => text.parse().map_err(serde::de::Error::custom),
    }
}

impl ResumeFields {
    /// The fields of an auth or op-12 body; a body without them (or not
    /// JSON) opts out.
    pub fn parse(body: &[u8]) -> Result<ResumeFields, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

fn null_is_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Why a client was refused. The messages never contain the token.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth body is not valid JSON for goim's fields: {0}")]
    InvalidBody(#[from] serde_json::Error),
    #[error("auth body is not a JSON object")]
    NotAnObject,
    #[error("auth body has no token")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("token expired")]
    ExpiredToken,
    #[error("body mid {body} is not the token's {token}")]
    MidMismatch { body: i64, token: i64 },
    #[error("body key is not the token's")]
    KeyMismatch,
    #[error("room {0:?} is not allowed by the token")]
    RoomForbidden(String),
    #[error("op {0} is not allowed by the token")]
    AcceptForbidden(i32),
    #[error("denied by the auth webhook{}", .0.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    WebhookDenied(Option<String>),
    #[error("auth webhook failed: {0}")]
    WebhookFailed(String),
}

impl AuthError {
    /// The `result` label of `pushcluster_logic_connects_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::InvalidBody(_) | AuthError::NotAnObject => "invalid_body",
            AuthError::MissingToken => "missing_token",
            AuthError::InvalidToken(_) => "invalid_token",
            AuthError::ExpiredToken => "expired_token",
            AuthError::MidMismatch { .. } => "mid_mismatch",
            AuthError::KeyMismatch => "key_mismatch",
            AuthError::RoomForbidden(_) => "room_forbidden",
            AuthError::AcceptForbidden(_) => "accept_forbidden",
            AuthError::WebhookDenied(_) => "webhook_denied",
            AuthError::WebhookFailed(_) => "webhook_error",
        }
    }

    /// Whether the client was refused (rather than logic failing to ask).
    pub fn is_refusal(&self) -> bool {
        !matches!(self, AuthError::WebhookFailed(_))
    }
}

/// Why the authenticator could not be set up from the configuration.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no RSA or EC public key in PEM: {message}")]
    Key { path: String, message: String },
    #[error("{0} is empty")]
    EmptySecret(String),
    #[error("logic.auth.webhook: {0}")]
    Webhook(String),
}

/// Who an authenticated client is: what logic answers the comet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub mid: i64,
    /// `None`: logic generates a key.
    pub key: Option<String>,
    pub room_id: String,
    /// Rooms besides `room_id`.
    pub rooms: Vec<String>,
    /// `Some`: the connection may be in these rooms only (the token's
    /// `room`/`rooms` claims, the webhook's `rooms`).
    pub allowed_rooms: Option<Vec<String>>,
    pub accepts: Vec<i32>,
}

impl Identity {
    /// goim's trust: whatever the body says.
    fn from_body(body: AuthBody) -> Identity {
        Identity {
            mid: body.mid,
            key: Some(body.key).filter(|k| !k.is_empty()),
            room_id: body.room_id,
            rooms: body.rooms,
            allowed_rooms: None,
            accepts: body.accepts,
        }
    }
}

/// `logic.auth.mode`, ready to use.
pub enum Authenticator {
    /// goim's behaviour: the body is believed.
    Open,
    Jwt(JwtVerifier),
    Webhook(WebhookClient),
}

impl Authenticator {
    pub fn from_config(config: &AuthConfig) -> Result<Authenticator, AuthSetupError> {
        Ok(match config.mode {
            None | Some(AuthMode::None) => Authenticator::Open,
            Some(AuthMode::Jwt) => Authenticator::Jwt(JwtVerifier::new(&config.jwt)?),
            Some(AuthMode::Webhook) => Authenticator::Webhook(WebhookClient::new(&config.webhook)?),
        })
    }

    /// Decides who the client sending `raw` (the auth frame's body) is.
    /// `cookie` is the WebSocket upgrade's Cookie header, `comet` the
    /// comet's id.
    pub async fn authenticate(
        &self,
        raw: &[u8],
        cookie: &str,
        comet: &str,
    ) -> Result<Identity, AuthError> {
        let body = AuthBody::parse(raw)?;
        match self {
            Authenticator::Open => Ok(Identity::from_body(body)),
            Authenticator::Jwt(verifier) => verifier.verify(body),
            Authenticator::Webhook(client) => client.ask(raw, body, cookie, comet).await,
        }
    }
}

/// The JWT claims pushcluster reads. `sub` is the mid.
#[derive(Debug, Deserialize)]
struct Claims {
    sub: MidClaim,
    #[serde(default)]
    room: Option<String>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    accepts: Option<Vec<i32>>,
    #[serde(default)]
    key: Option<String>,
}

/// `sub` is a string in the JWT spec; a number is accepted too.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MidClaim {
    Number(i64),
    Text(String),
}

/// The keys one check of the files produced.
struct KeySet {
    hmac: Option<DecodingKey>,
    rsa: Vec<DecodingKey>,
    ec: Vec<DecodingKey>,
}

/// `jwt` mode: verifies the body's `token` and holds the body to it. Key
/// files are re-read in the background when their modification time or size
/// changes (looked at every `reload_interval`), so rotated Kubernetes
/// Secrets apply without a restart and verifying never touches a file.
pub struct JwtVerifier {
    config: JwtConfig,
    keys: Arc<Reloading<KeySet>>,
}

impl JwtVerifier {
    pub fn new(config: &JwtConfig) -> Result<JwtVerifier, AuthSetupError> {
        let files = config
            .hs256_secret_file
            .iter()
            .chain(config.public_key_files.iter())
            .cloned()
            .collect();
        let keys = {
            let config = config.clone();
            Reloading::start("JWT keys", files, config.reload_interval, move || {
                load_keys(&config)
            })?
        };
        Ok(JwtVerifier {
            config: config.clone(),
            keys,
        })
    }

    pub fn verify(&self, body: AuthBody) -> Result<Identity, AuthError> {
        if body.token.is_empty() {
            return Err(AuthError::MissingToken);
        }
        let header = jsonwebtoken::decode_header(&body.token)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let keys = self.keys.current();
        let candidates: Vec<&DecodingKey> = match header.alg {
            Algorithm::HS256 => keys.hmac.iter().collect(),
            Algorithm::RS256 => keys.rsa.iter().collect(),
            Algorithm::ES256 => keys.ec.iter().collect(),
            other => {
                return Err(AuthError::InvalidToken(format!(
                    "algorithm {other:?} is not accepted"
                )));
            }
        };
        if candidates.is_empty() {
            return Err(AuthError::InvalidToken(format!(
                "no key configured for {:?}",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.config.leeway.as_secs();
        // `sub` is required by `Claims` itself: jsonwebtoken's own check
        // would refuse a numeric one.
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_nbf = true;
        if let Some(issuer) = &self.config.issuer {
            validation.set_issuer(&[issuer]);
        }
        match &self.config.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let mut last_error = None;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(&body.token, key, &validation) {
                Ok(data) => return hold_to_claims(body, data.claims),
                Err(error) => last_error = Some(error),
            }
        }
        Err(match last_error.map(|e| e.into_kind()) {
            Some(jsonwebtoken::errors::ErrorKind::ExpiredSignature) => AuthError::ExpiredToken,
            Some(kind) => AuthError::InvalidToken(format!("{kind:?}")),
            None => AuthError::InvalidToken("not verified".into()),
        })
    }
}

/// The body may repeat what the token says, narrow it, or leave it out;
/// it may not contradict it.
fn hold_to_claims(body: AuthBody, claims: Claims) -> Result<Identity, AuthError> {
    let mid = match claims.sub {
        MidClaim::Number(mid) => mid,
        MidClaim::Text(text) => text
            .parse()
            .map_err(|_| AuthError::InvalidToken("sub is not a numeric mid".into()))?,
    };
    if body.mid != 0 && body.mid != mid {
        return Err(AuthError::MidMismatch {
            body: body.mid,
            token: mid,
        });
    }
    // A key names a connection; letting a client pick one would let it take
    // over another's. Only the token may name it; otherwise logic makes one.
    let key = match claims.key {
        Some(key) if !body.key.is_empty() && body.key != key => {
            return Err(AuthError::KeyMismatch);
        }
        Some(key) => Some(key),
        None => None,
    };
    let allowed_rooms: Option<Vec<String>> = match (claims.room, claims.rooms) {
        (None, None) => None,
        (room, rooms) => Some(room.into_iter().chain(rooms.unwrap_or_default()).collect()),
    };
    let room_id = match &allowed_rooms {
        Some(allowed) if !body.room_id.is_empty() => {
            if !allowed.contains(&body.room_id) {
                return Err(AuthError::RoomForbidden(body.room_id));
            }
            body.room_id
        }
        Some(allowed) if allowed.len() == 1 => allowed[0].clone(),
        _ => body.room_id,
    };
    if let Some(allowed) = &allowed_rooms
        && let Some(room) = body.rooms.iter().find(|room| !allowed.contains(room))
    {
        return Err(AuthError::RoomForbidden(room.clone()));
    }
    let accepts = match claims.accepts {
        Some(allowed) if body.accepts.is_empty() => allowed,
        Some(allowed) => {
            if let Some(op) = body.accepts.iter().find(|op| !allowed.contains(op)) {
                return Err(AuthError::AcceptForbidden(*op));
            }
            body.accepts
        }
        None => body.accepts,
    };
    Ok(Identity {
        mid,
        key,
        room_id,
        rooms: body.rooms,
        allowed_rooms,
        accepts,
    })
}

fn read(path: &str) -> Result<Vec<u8>, AuthSetupError> {
    std::fs::read(path).map_err(|source| AuthSetupError::Read {
        path: path.to_string(),
        source,
    })
}

fn load_keys(config: &JwtConfig) -> Result<KeySet, AuthSetupError> {
    let hmac = match (&config.hs256_secret, &config.hs256_secret_file) {
        (Some(secret), _) => Some(DecodingKey::from_secret(secret.as_bytes())),
        (None, Some(path)) => {
            let secret = read(path)?;
            // A Secret mounted as a file often ends with a newline.
            let secret = secret.trim_ascii_end();
            if secret.is_empty() {
                return Err(AuthSetupError::EmptySecret(path.clone()));
            }
            Some(DecodingKey::from_secret(secret))
        }
        (None, None) => None,
    };
    let mut rsa = Vec::new();
    let mut ec = Vec::new();
    for path in &config.public_key_files {
        let pem = read(path)?;
        match DecodingKey::from_rsa_pem(&pem) {
            Ok(key) => rsa.push(key),
            Err(rsa_error) => match DecodingKey::from_ec_pem(&pem) {
                Ok(key) => ec.push(key),
                Err(ec_error) => {
                    return Err(AuthSetupError::Key {
                        path: path.clone(),
                        message: format!("as RSA: {rsa_error}; as EC: {ec_error}"),
                    });
                }
            },
        }
    }
    Ok(KeySet { hmac, rsa, ec })
}

/// `webhook` mode: logic POSTs the auth body to the business backend.
pub struct WebhookClient {
    url: String,
    timeout: Duration,
    bearer_token: Option<String>,
    http: reqwest::Client,
}

/// What logic sends the webhook.
#[derive(serde::Serialize)]
struct WebhookRequest<'a> {
    /// The auth body as the client sent it (a JSON object).
    body: serde_json::Value,
    /// The WebSocket upgrade's Cookie header ("" for TCP clients).
    cookie: &'a str,
    /// The comet the client is on.
    comet: &'a str,
}

/// What the webhook answers (HTTP 2xx). Fields it sets override the body's.
#[derive(Debug, Deserialize)]
struct WebhookAnswer {
    allow: bool,
    #[serde(default)]
    mid: Option<i64>,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    room_id: Option<String>,
    /// The rooms the connection may be in (then the body's are checked).
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    accepts: Option<Vec<i32>>,
    #[serde(default)]
    reason: Option<String>,
}

/// Longest webhook answer read; a larger one is a failure.
const MAX_WEBHOOK_ANSWER: usize = 64 * 1024;

impl WebhookClient {
    pub fn new(config: &WebhookConfig) -> Result<WebhookClient, AuthSetupError> {
        let builder = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none());
        let http = builder
            .build()
            .map_err(|e| AuthSetupError::Webhook(e.to_string()))?;
        Ok(WebhookClient {
            url: config.url.clone(),
            timeout: config.timeout,
            bearer_token: config.bearer_token.clone(),
            http,
        })
    }

    async fn ask(
        &self,
        raw: &[u8],
        body: AuthBody,
        cookie: &str,
        comet: &str,
    ) -> Result<Identity, AuthError> {
        let request = WebhookRequest {
            body: serde_json::from_slice(raw)?,
            cookie,
            comet,
        };
        let payload = serde_json::to_vec(&request)?;
        let mut post = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(payload);
        if let Some(token) = &self.bearer_token {
            post = post.bearer_auth(token);
        }
        let failed = |what: String| AuthError::WebhookFailed(what);
        let response = tokio::time::timeout(self.timeout, post.send())
            .await
            .map_err(|_| failed(format!("no answer in {:?}", self.timeout)))?
            .map_err(|e| failed(without_url(e)))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(AuthError::WebhookDenied(Some(format!("HTTP {status}"))));
        }
        if !status.is_success() {
            return Err(failed(format!("HTTP {status}")));
        }
        let bytes = tokio::time::timeout(self.timeout, response.bytes())
            .await
            .map_err(|_| failed(format!("no answer in {:?}", self.timeout)))?
            .map_err(|e| failed(without_url(e)))?;
        if bytes.len() > MAX_WEBHOOK_ANSWER {
            return Err(failed(format!("answer over {MAX_WEBHOOK_ANSWER} bytes")));
        }
        let answer: WebhookAnswer = serde_json::from_slice(&bytes)
            .map_err(|e| failed(format!("answer is not {{\"allow\": bool, ...}}: {e}")))?;
        if !answer.allow {
            return Err(AuthError::WebhookDenied(answer.reason));
        }
        let mut identity = Identity::from_body(body);
        if let Some(mid) = answer.mid {
            identity.mid = mid;
        }
        if let Some(key) = answer.key {
            identity.key = Some(key).filter(|k| !k.is_empty());
        }
        if let Some(room_id) = answer.room_id {
            identity.room_id = room_id;
        }
        if let Some(accepts) = answer.accepts {
            identity.accepts = accepts;
        }
        if let Some(allowed) = answer.rooms {
            if let Some(room) = std::iter::once(&identity.room_id)
                .filter(|room| !room.is_empty())
                .chain(&identity.rooms)
                .find(|room| !allowed.contains(room))
            {
                return Err(AuthError::RoomForbidden(room.clone()));
            }
            identity.allowed_rooms = Some(allowed);
        }
        Ok(identity)
    }
}

/// reqwest's errors name the URL, which may carry credentials.
fn without_url(error: reqwest::Error) -> String {
    error.without_url().to_string()
}

impl AuthBody {
    pub fn parse(token: &[u8]) -> Result<AuthBody, AuthError> {
        // serde would also take an array for a struct; Go's decoder would not.
        let first = token.iter().find(|b| !b.is_ascii_whitespace());
        if first.is_some_and(|b| *b != b'{') {
            return Err(AuthError::NotAnObject);
        }
        Ok(serde_json::from_slice(token)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goim_example_body() {
        let body = AuthBody::parse(
            br#"{"mid":123,"key":"","room_id":"live://1000","platform":"web","accepts":[1000,1001,1002]}"#,
        )
        .expect("valid");
        assert_eq!(
            body,
            AuthBody {
                mid: 123,
                key: String::new(),
                room_id: "live://1000".into(),
                platform: "web".into(),
                accepts: vec![1000, 1001, 1002],
                token: String::new(),
                rooms: Vec::new(),
            }
        );
    }

    #[test]
    fn missing_null_and_unknown_fields_are_fine() {
        let body = AuthBody::parse(br#"{"mid":null,"extra":{"a":1}}"#).expect("valid");
        assert_eq!(body, AuthBody::default());
    }

    #[test]
    fn wrong_types_and_bad_json_are_refused() {
        for bad in [
            &br#"{"mid":"1"}"#[..],
            br#"{"mid":1.5}"#,
            br#"{"accepts":"1000"}"#,
            b"",
            b"not json",
            br#"[1]"#,
        ] {
            assert!(
                AuthBody::parse(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
