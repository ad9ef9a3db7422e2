//! Noticing that files changed (a rotated Secret, a renewed certificate)
//! without a watcher thread: a caller asks on its own schedule, at most
//! once per interval, and reloads only when a file's modification time or
//! size moved. Symlinks are followed, so Kubernetes' atomic Secret updates
//! (a symlink swap) are seen.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// What the files looked like: (modified, length) each, `None` if unreadable.
pub type Fingerprint = Vec<Option<(SystemTime, u64)>>;

#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<String>,
    interval: Duration,
    /// When the files were last looked at, and the fingerprint last loaded.
    state: Mutex<(Instant, Fingerprint)>,
}

impl FileWatch {
    /// Watches `paths` as they are now (just loaded by the caller).
    pub fn new(paths: Vec<String>, interval: Duration) -> FileWatch {
        let now = fingerprint(&paths);
        FileWatch {
            paths,
            interval,
            state: Mutex::new((Instant::now(), now)),
        }
    }

    /// The new fingerprint if the interval passed and a file changed since
    /// the last [`FileWatch::loaded`]; the caller reloads, then confirms.
    pub fn changed(&self) -> Option<Fingerprint> {
        if self.paths.is_empty() {
            return None;
        }
        let mut state = self.state.lock().ok()?;
        if state.0.elapsed() < self.interval {
            return None;
        }
        state.0 = Instant::now();
        let now = fingerprint(&self.paths);
        (now != state.1).then_some(now)
    }

    /// The files as `fingerprint` were loaded; a failed load does not call
    /// this, so the next look tries again.
    pub fn loaded(&self, fingerprint: Fingerprint) {
        if let Ok(mut state) = self.state.lock() {
            state.1 = fingerprint;
        }
    }
}

fn fingerprint(paths: &[String]) -> Fingerprint {
    paths
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_reported_until_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "one").expect("write");
        let watch = FileWatch::new(vec![file.display().to_string()], Duration::ZERO);
        assert!(watch.changed().is_none(), "unchanged");
        std::fs::write(&file, "two, longer").expect("write");
        let seen = watch.changed().expect("changed");
        assert!(watch.changed().is_some(), "still changed until loaded");
        watch.loaded(seen);
        assert!(watch.changed().is_none());
    }

    #[test]
    fn looks_at_most_once_per_interval() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "one").expect("write");
        let watch = FileWatch::new(vec![file.display().to_string()], Duration::from_secs(3600));
        std::fs::write(&file, "two, longer").expect("write");
        assert!(
            watch.changed().is_none(),
            "not looked at within the interval"
        );
    }
}
