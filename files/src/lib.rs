//! Values loaded from files — JWT keys, API tokens, TLS certificates — that
//! follow the files when they change (a rotated Kubernetes Secret, a renewed
//! certificate) without a restart.
//!
//! The files are looked at in the background, at most once per interval, on
//! a blocking thread: the paths that use a value (verifying a token,
//! choosing a certificate, checking an API token) only read it from memory
//! and never touch the file system. A file counts as changed when its
//! modification time or size moved; symlinks are followed, so Kubernetes'
//! atomic Secret updates (a symlink swap) are seen. A load that fails (a
//! half-written file mid-rotation) keeps the old value and is tried again
//! at the next look.
#![forbid(unsafe_code)]

use std::fmt::Display;
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

/// What the files looked like: (modified, length) each, `None` if unreadable.
type Fingerprint = Vec<Option<(SystemTime, u64)>>;

fn fingerprint(paths: &[String]) -> Fingerprint {
    paths
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

/// A value loaded from files, replaced when they change.
#[derive(Debug)]
pub struct Reloading<T> {
    current: RwLock<Arc<T>>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// A value that never changes (nothing to watch).
    pub fn fixed(value: T) -> Arc<Reloading<T>> {
        Arc::new(Reloading {
            current: RwLock::new(Arc::new(value)),
        })
    }

    /// Loads the value now — a failure is the caller's to report (a bad
    /// file at start is a configuration error) — then, on a Tokio runtime,
    /// re-reads `paths` every `interval` in the background for as long as
    /// the returned value is held. `what` names the value in logs.
    pub fn start<E, F>(
        what: &'static str,
        paths: Vec<String>,
        interval: Duration,
        load: F,
    ) -> Result<Arc<Reloading<T>>, E>
    where
        E: Display + Send + 'static,
        F: Fn() -> Result<T, E> + Send + Sync + 'static,
    {
        let seen = fingerprint(&paths);
        let reloading = Reloading::fixed(load()?);
        if paths.is_empty() {
            return Ok(reloading);
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(watch(
                    Arc::downgrade(&reloading),
                    what,
                    paths,
                    interval,
                    seen,
                    Arc::new(load),
                ));
            }
            Err(_) => tracing::warn!("no async runtime: {what} are read only once"),
        }
        Ok(reloading)
    }

    /// The value as last loaded.
    pub fn current(&self) -> Arc<T> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    fn replace(&self, value: T) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
    }
}

async fn watch<T, E, F>(
    target: Weak<Reloading<T>>,
    what: &'static str,
    paths: Vec<String>,
    interval: Duration,
    mut seen: Fingerprint,
    load: Arc<F>,
) where
    T: Send + Sync + 'static,
    E: Display + Send + 'static,
    F: Fn() -> Result<T, E> + Send + Sync + 'static,
{
    let paths = Arc::new(paths);
    loop {
        tokio::time::sleep(interval).await;
        if target.strong_count() == 0 {
            return;
        }
        let (paths, load, before) = (paths.clone(), load.clone(), seen.clone());
        // Looking and loading are file I/O: off the async threads.
        let looked = tokio::task::spawn_blocking(move || {
            let now = fingerprint(&paths);
            (now != before).then(|| (now, load()))
        })
        .await;
        let Ok(Some((now, loaded))) = looked else {
            continue;
        };
        let Some(target) = target.upgrade() else {
            return;
        };
        match loaded {
            Ok(value) => {
                target.replace(value);
                seen = now;
                tracing::info!("{what} reloaded");
            }
            // Mid-rotation a pair may not match yet: keep the old value and
            // look again next time.
            Err(error) => tracing::warn!(%error, "{what} not reloaded; the old value stays"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_from(path: &std::path::Path) -> impl Fn() -> Result<String, String> + use<> {
        let path = path.to_path_buf();
        move || {
            let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            if text.starts_with("bad") {
                return Err("half-written".into());
            }
            Ok(text)
        }
    }

    /// The file's text, looked at every 10 ms.
    fn watching(file: &std::path::Path) -> Arc<Reloading<String>> {
        Reloading::start(
            "test key",
            vec![file.display().to_string()],
            Duration::from_millis(10),
            load_from(file),
        )
        .expect("loads")
    }

    async fn wait_for(value: &Reloading<String>, want: &str) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while *value.current() != want {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{want:?} in time"));
    }

    #[tokio::test]
    async fn a_changed_file_is_picked_up_in_the_background() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "one").expect("write");
        let value = watching(&file);
        assert_eq!(*value.current(), "one");
        std::fs::write(&file, "two, longer").expect("write");
        wait_for(&value, "two, longer").await;
    }

    #[tokio::test]
    async fn a_failed_reload_keeps_the_old_value_and_tries_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "good").expect("write");
        let value = watching(&file);
        std::fs::write(&file, "bad and half-written").expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*value.current(), "good");
        std::fs::write(&file, "fixed at last").expect("write");
        wait_for(&value, "fixed at last").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_reload_never_holds_up_the_readers() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        std::fs::write(&file, "fast").expect("write");
        let loading = Arc::new(AtomicBool::new(false));
        let load = {
            let (file, loading) = (file.clone(), loading.clone());
            move || -> Result<String, String> {
                let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
                if text == "slow" {
                    // A file system that takes its time (a network mount).
                    loading.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(800));
                }
                Ok(text)
            }
        };
        let value = Reloading::start(
            "test key",
            vec![file.display().to_string()],
            Duration::from_millis(10),
            load,
        )
        .expect("loads");
        std::fs::write(&file, "slow").expect("write");
        tokio::time::timeout(Duration::from_secs(10), async {
            while !loading.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the reload started");
        let started = std::time::Instant::now();
        assert_eq!(*value.current(), "fast", "the old value while loading");
        assert!(started.elapsed() < Duration::from_millis(100));
        wait_for(&value, "slow").await;
    }

    #[test]
    fn a_value_that_cannot_load_at_start_is_an_error() {
        let result = Reloading::start(
            "test key",
            vec!["/nonexistent/key".into()],
            Duration::from_secs(1),
            || std::fs::read_to_string("/nonexistent/key").map_err(|e| e.to_string()),
        );
        assert!(result.is_err());
    }
}
