//! Names of the histories clients keep positions in (`docs/recovery.md`).
//!
//! A room's history is named by the room id. goim's push API builds room
//! ids as `type://room`, so names that start with `@` never collide with a
//! room that can receive pushes; they name a user's *direct* streams:
//! `@mid:<mid>` (pushes to the user's mid) and `@key:<key>` (pushes to one
//! connection key).

/// A direct stream: what `/goim/push/mids` or `/goim/push/keys` sends to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DirectStream {
    Mid(i64),
    Key(String),
}

const MID_PREFIX: &str = "@mid:";
const KEY_PREFIX: &str = "@key:";

impl DirectStream {
    /// The stream's name, as clients see it in positions and `since`.
    pub fn name(&self) -> String {
        match self {
            DirectStream::Mid(mid) => format!("{MID_PREFIX}{mid}"),
            DirectStream::Key(key) => format!("{KEY_PREFIX}{key}"),
        }
    }

    /// The direct stream `name` refers to (`None`: a room, or malformed).
    pub fn parse(name: &str) -> Option<DirectStream> {
        if let Some(mid) = name.strip_prefix(MID_PREFIX) {
            return mid.parse().ok().map(DirectStream::Mid);
        }
        name.strip_prefix(KEY_PREFIX)
            .filter(|key| !key.is_empty())
            .map(|key| DirectStream::Key(key.to_string()))
    }
}

/// Whether `name` is reserved for direct streams: a room by that name never
/// reads history (it would be someone's direct messages).
pub fn is_direct(name: &str) -> bool {
    name.starts_with('@')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_rooms_are_not_direct() {
        for stream in [
            DirectStream::Mid(42),
            DirectStream::Mid(-7),
            DirectStream::Key("a:b@c".into()),
        ] {
            assert_eq!(DirectStream::parse(&stream.name()), Some(stream.clone()));
            assert!(is_direct(&stream.name()));
        }
        assert_eq!(DirectStream::parse("live://1000"), None);
        assert_eq!(DirectStream::parse("@mid:x"), None);
        assert_eq!(DirectStream::parse("@key:"), None);
        assert!(!is_direct("live://1000"));
    }
}
