//! Temporary directories for one test or demo run: unique per process and
//! call, removed on drop (kept when `KONDUIT_E2E_KEEP` is set, for post-mortems).
//! Owns nothing outside the directory it created.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// A directory under the system temp dir that is removed when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `$TMPDIR/konduit-<tag>-<pid>-<n>`. Short on purpose: unix socket paths
    /// inside it must stay under 108 bytes.
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("konduit-{tag}-{}-{n}", std::process::id()));
        // A leftover from a crashed run with a recycled pid is stale by definition.
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create temp dir {}: {e}", path.display()));
        TempDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KONDUIT_E2E_KEEP").is_some() {
            eprintln!("keeping {} (KONDUIT_E2E_KEEP is set)", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
