//! The body of a client's op-7 auth frame (PROTOCOL.md §1.4), parsed the
//! way goim's `json.Unmarshal` does: unknown fields are ignored, `null` is
//! the zero value, a wrong type or invalid JSON is an error.

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
}

fn null_is_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// Why an auth body was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth body is not valid JSON for goim's fields: {0}")]
    InvalidBody(#[from] serde_json::Error),
    #[error("auth body is not a JSON object")]
    NotAnObject,
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::InvalidBody(_) | AuthError::NotAnObject => "invalid_body",
        }
    }
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
