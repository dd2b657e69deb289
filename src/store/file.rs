//! The embedded default store: one JSON document beside the config
//! (`{"version": 1, "providers": {"crm": TokenRecord, ...}}`).
//!
//! The document is read once at start-up and kept in memory, so `load` never touches
//! the disk. Every `save` rewrites the whole file atomically (temp file in the same
//! folder, fsync, rename over, fsync the folder): a crash leaves either the old or
//! the new document, never a torn one. An unreadable document (corrupt JSON) and
//! one whose tokens cannot be decrypted (another key, tampered with) are set aside
//! under a new name, reported once, and the store starts empty, so the providers
//! fetch new tokens. Nothing is deleted: with the right key back, the set-aside
//! file can be restored by renaming it.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::crypto::Cipher;
use super::record::TokenRecord;
use super::token_store::{StoreError, StoreFuture, StoredToken, TokenStore};

/// The document format this build reads and writes.
const VERSION: u64 = 1;

/// Makes temp and probe names unique within the process, so two stores on the same
/// path (e.g. old and new config during a reload) never share a temp file.
static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

#[derive(Serialize, Deserialize)]
struct Document {
    version: u64,
    providers: BTreeMap<String, TokenRecord>,
}

/// Read first, on its own, so an unknown version is reported as such rather than as
/// whatever field the newer format changed.
#[derive(Deserialize)]
struct Header {
    version: Option<serde_json::Value>,
}

pub struct FileStore {
    shared: Arc<Shared>,
    // Held by the blocking write itself (an owned guard moved into it), so a caller
    // that gives up on a save cannot let the next save start before it finished.
    writer: Arc<tokio::sync::Mutex<()>>,
}

struct Shared {
    path: PathBuf,
    cipher: Option<Arc<Cipher>>,
    /// What is on disk, decrypted. Replaced only after a write succeeded.
    tokens: Mutex<BTreeMap<String, StoredToken>>,
}

impl FileStore {
    /// Opens (or creates) the store at `path`. Blocking file I/O: call it at start-up
    /// or from `spawn_blocking` (`store::open` does).
    ///
    /// Errors, all meant for a start-up message:
    /// - `Io` naming the folder when it cannot be created or written (probed with a
    ///   test file), or the file when it exists but cannot be read. Whether that is
    ///   fatal is the caller's decision: it may log it and fall back to a memory store.
    /// - `Config` when the file is encrypted and no key is configured.
    ///
    /// A corrupt document or one of an unknown version is not an error: it is renamed
    /// to `<file>.corrupt-<unix-ts>`, a warning names it, and the store starts empty.
    /// Likewise a document with a token that does not decrypt with the configured key
    /// (another key, or altered): renamed to `<file>.unreadable-<UTC time>`.
    pub fn open(path: &Path, cipher: Option<Arc<Cipher>>) -> Result<FileStore, StoreError> {
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                StoreError::Config(format!(
                    "store path {} does not name a file",
                    path.display()
                ))
            })?
            .to_owned();
        let dir = parent_dir(path);
        create_dir(&dir)
            .map_err(|e| io_error(&dir, context(e, "cannot create the store folder")))?;
        probe_writable(&dir, &file_name)
            .map_err(|e| io_error(&dir, context(e, "the store folder is not writable")))?;
        remove_stale_temps(&dir, &file_name);

        let mut tokens = BTreeMap::new();
        let mut plaintext = 0usize;
        for (provider, record) in read_document(path)? {
            plaintext += usize::from(!record.encrypted);
            match record.open(&provider, cipher.as_deref()) {
                Ok(token) => {
                    tokens.insert(provider, token);
                }
                Err(e @ StoreError::Crypto(_)) => {
                    let reason = locate(e, path, &provider).to_string();
                    set_unreadable_aside(path, &reason);
                    tokens.clear();
                    plaintext = 0;
                    break;
                }
                Err(e) => return Err(locate(e, path, &provider)),
            }
        }
        if cipher.is_some() && plaintext > 0 {
            tracing::info!(
                file = %path.display(),
                records = plaintext,
                "token store holds unencrypted records; they are encrypted on the next save"
            );
        }
        Ok(FileStore {
            shared: Arc::new(Shared {
                path: path.to_owned(),
                cipher,
                tokens: Mutex::new(tokens),
            }),
            writer: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

impl Shared {
    fn tokens(&self) -> MutexGuard<'_, BTreeMap<String, StoredToken>> {
        // Only ever replaced whole, so a poisoned lock still guards a consistent map.
        self.tokens.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes the document with `token` in it, then makes it the in-memory state.
    fn commit(&self, provider: String, token: StoredToken) -> Result<(), StoreError> {
        let mut next = self.tokens().clone();
        next.insert(provider, token);
        let bytes = self.encode(&next)?;
        write_atomic(&self.path, &bytes).map_err(|e| io_error(&self.path, e))?;
        *self.tokens() = next;
        Ok(())
    }

    fn encode(
        &self,
        tokens: &BTreeMap<String, StoredToken>,
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let providers = tokens
            .iter()
            .map(|(name, t)| {
                Ok((
                    name.clone(),
                    TokenRecord::seal(name, t, self.cipher.as_deref())?,
                ))
            })
            .collect::<Result<_, StoreError>>()?;
        let doc = Document {
            version: VERSION,
            providers,
        };
        let mut bytes = Zeroizing::new(
            serde_json::to_vec_pretty(&doc)
                .map_err(|e| io_error(&self.path, io::Error::other(e)))?,
        );
        bytes.push(b'\n');
        Ok(bytes)
    }
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.shared.path)
            .field("encrypted", &self.shared.cipher.is_some())
            .field("providers", &self.shared.tokens().len())
            .finish()
    }
}

impl TokenStore for FileStore {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn load<'a>(&'a self, provider: &'a str) -> StoreFuture<'a, Option<StoredToken>> {
        Box::pin(async move { Ok(self.shared.tokens().get(provider).cloned()) })
    }

    fn save<'a>(&'a self, provider: &'a str, token: &'a StoredToken) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let writing = Arc::clone(&self.writer).lock_owned().await;
            let shared = Arc::clone(&self.shared);
            let (provider, token) = (provider.to_owned(), token.clone());
            tokio::task::spawn_blocking(move || {
                let _writing = writing;
                shared.commit(provider, token)
            })
            .await
            .map_err(|e| {
                io_error(
                    &self.shared.path,
                    io::Error::other(format!("store write task failed: {e}")),
                )
            })?
        })
    }
}

/// The records in the file; empty when there is none, or when it was set aside.
fn read_document(path: &Path) -> Result<BTreeMap<String, TokenRecord>, StoreError> {
    let bytes = match fs::read(path) {
        Ok(b) => Zeroizing::new(b),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(io_error(path, e)),
    };
    match parse(&bytes) {
        Ok(providers) => Ok(providers),
        Err(reason) => {
            set_aside(path, &reason.to_string());
            Ok(BTreeMap::new())
        }
    }
}

/// The tokens a store document holds, decoded as `open` decodes them at start-up.
/// Public for the fuzz target: whatever a damaged disk or another program left in
/// the file gives tokens or an error, never a panic.
pub fn decode(
    bytes: &[u8],
    cipher: Option<&Cipher>,
) -> Result<BTreeMap<String, StoredToken>, StoreError> {
    let records = parse(bytes).map_err(|reason| StoreError::Corrupt {
        path: "(document)".into(),
        reason: reason.to_string(),
    })?;
    records
        .into_iter()
        .map(|(provider, record)| Ok((provider.clone(), record.open(&provider, cipher)?)))
        .collect()
}

/// Why a store file cannot be read back. Never quotes the file: serde_json's own
/// messages can carry values from it, which may be tokens.
#[derive(Debug, PartialEq, thiserror::Error)]
enum Damaged {
    #[error("{kind} at line {line} column {column}")]
    Json {
        kind: &'static str,
        line: usize,
        column: usize,
    },
    #[error("unknown version {0} (this build reads {VERSION})")]
    UnknownVersion(u64),
    #[error("unknown version (not a number)")]
    VersionNotANumber,
    #[error("no \"version\" field")]
    NoVersion,
}

impl From<serde_json::Error> for Damaged {
    fn from(e: serde_json::Error) -> Self {
        use serde_json::error::Category;
        let kind = match e.classify() {
            Category::Io => "read error",
            Category::Syntax => "invalid JSON",
            Category::Data => "unexpected content",
            Category::Eof => "truncated JSON",
        };
        Damaged::Json {
            kind,
            line: e.line(),
            column: e.column(),
        }
    }
}

fn parse(bytes: &[u8]) -> Result<BTreeMap<String, TokenRecord>, Damaged> {
    let header: Header = serde_json::from_slice(bytes)?;
    match header.version.as_ref().map(|v| v.as_u64()) {
        Some(Some(VERSION)) => {}
        Some(Some(other)) => return Err(Damaged::UnknownVersion(other)),
        Some(None) => return Err(Damaged::VersionNotANumber),
        None => return Err(Damaged::NoVersion),
    }
    let doc: Document = serde_json::from_slice(bytes)?;
    Ok(doc.providers)
}

fn set_aside(path: &Path, reason: &str) {
    let stamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut aside = with_suffix(path, &format!(".corrupt-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        aside = with_suffix(path, &format!(".corrupt-{stamp}-{n}"));
        n += 1;
    }
    match fs::rename(path, &aside) {
        Ok(()) => tracing::warn!(
            file = %path.display(),
            moved_to = %aside.display(),
            reason,
            "token store file is unreadable: set aside, starting with an empty store"
        ),
        Err(e) => tracing::warn!(
            file = %path.display(),
            reason,
            error = %e,
            "token store file is unreadable and could not be set aside: starting with an \
             empty store, the file is replaced on the next save"
        ),
    }
}

/// Sets aside a document that parses but cannot be decrypted, as
/// `<file>.unreadable-<UTC time>` (no `:` in it: Windows file names cannot hold one).
fn set_unreadable_aside(path: &Path, reason: &str) {
    let stamp = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .replace(':', "-");
    let mut aside = with_suffix(path, &format!(".unreadable-{stamp}"));
    let mut n = 1;
    while aside.exists() {
        aside = with_suffix(path, &format!(".unreadable-{stamp}-{n}"));
        n += 1;
    }
    match fs::rename(path, &aside) {
        Ok(()) => tracing::error!(
            file = %path.display(),
            moved_to = %aside.display(),
            reason,
            "token store cannot be read back with this key: set aside, starting with an \
             empty store; providers fetch new tokens"
        ),
        Err(e) => tracing::error!(
            file = %path.display(),
            reason,
            error = %e,
            "token store cannot be read back with this key and could not be set aside: \
             starting with an empty store, the file is replaced on the next save"
        ),
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = parent_dir(path);
    let tmp = with_suffix(path, &format!(".tmp-{}", unique()));
    let written = write_then_rename(&tmp, path, bytes);
    if written.is_err() {
        // Best effort: the temp file may hold secrets and must not pile up.
        let _ = fs::remove_file(&tmp);
    }
    written?;
    sync_dir(&dir)
}

fn write_then_rename(tmp: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = create_private(tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    // Windows cannot rename a file that is still open.
    drop(file);
    fs::rename(tmp, path)
}

/// A new file only its owner can read (Unix); the mode is also set explicitly, in
/// case a file of that name already existed with a wider one.
fn create_private(path: &Path) -> io::Result<File> {
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let file = opts.open(path)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    Ok(file)
}

/// Makes the rename itself durable.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Windows cannot open a folder as a file to flush it; NTFS journals the rename.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

fn create_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Permission bits say little (root, ACLs, read-only mounts): only a real write tells
/// whether saves will work.
fn probe_writable(dir: &Path, file_name: &str) -> io::Result<()> {
    let probe = dir.join(format!("{file_name}.probe-{}", unique()));
    let written = create_private(&probe).and_then(|mut f| f.write_all(b"probe"));
    let removed = fs::remove_file(&probe);
    written?;
    removed
}

/// Temp files left by a crash hold a copy of the tokens; remove them, except this
/// process's own (another store on the same path may be mid-write).
fn remove_stale_temps(dir: &Path, file_name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!("{file_name}.tmp-");
    let own = format!("{prefix}{}-", std::process::id());
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(&prefix) && !name.starts_with(&own) {
            match fs::remove_file(entry.path()) {
                Ok(()) => {
                    tracing::debug!(file = %entry.path().display(), "removed a stale store temp file")
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a stale store temp file")
                }
            }
        }
    }
}

fn unique() -> String {
    format!(
        "{}-{}",
        std::process::id(),
        NEXT_TEMP.fetch_add(1, Ordering::Relaxed)
    )
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn io_error(path: &Path, source: io::Error) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn context(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Adds the file and provider to a record's error so the start-up message says
/// where the problem is.
fn locate(e: StoreError, path: &Path, provider: &str) -> StoreError {
    let at = format!("{} (provider {provider:?})", path.display());
    match e {
        StoreError::Crypto(msg) => StoreError::Crypto(format!("{at}: {msg}")),
        StoreError::Config(msg) => StoreError::Config(format!("{at}: {msg}")),
        other => other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::store::record::tests::{cipher, token};

    fn key(byte: &str) -> Option<Arc<Cipher>> {
        Some(Arc::new(cipher(byte)))
    }

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    #[tokio::test]
    async fn round_trip_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/tokens.json");
        let store = FileStore::open(&path, None).unwrap();
        assert_eq!(store.load("crm").await.unwrap(), None);
        store.save("crm", &token(1)).await.unwrap();
        store.save("erp", &token(7)).await.unwrap();
        store.save("crm", &token(2)).await.unwrap();
        assert_eq!(store.load("crm").await.unwrap(), Some(token(2)));

        let reopened = FileStore::open(&path, None).unwrap();
        assert_eq!(reopened.load("crm").await.unwrap(), Some(token(2)));
        assert_eq!(reopened.load("erp").await.unwrap(), Some(token(7)));

        let doc: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["providers"]["crm"]["generation"], 2);
    }

    #[tokio::test]
    async fn encrypted_file_holds_no_plaintext_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path, key("ab")).unwrap();
        store.save("crm", &token(1)).await.unwrap();

        let bytes = fs::read(&path).unwrap();
        assert!(!contains(&bytes, "access-secret"));
        assert!(!contains(&bytes, "refresh-secret"));
        assert!(contains(&bytes, "\"encrypted\": true"));

        let reopened = FileStore::open(&path, key("ab")).unwrap();
        assert_eq!(reopened.load("crm").await.unwrap(), Some(token(1)));
    }

    #[tokio::test]
    async fn a_store_sealed_with_another_key_is_set_aside_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        FileStore::open(&path, key("ab"))
            .unwrap()
            .save("crm", &token(1))
            .await
            .unwrap();
        let sealed = fs::read(&path).unwrap();

        let store = FileStore::open(&path, key("cd")).unwrap();
        assert_eq!(store.load("crm").await.unwrap(), None, "starts empty");
        let names = names_in(dir.path());
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(
            names[0].starts_with("tokens.json.unreadable-") && names[0].ends_with('Z'),
            "{names:?}"
        );
        assert!(!names[0].contains(':'), "a valid Windows file name");
        assert_eq!(
            fs::read(dir.path().join(&names[0])).unwrap(),
            sealed,
            "kept as it was"
        );
        // The old key reads the set-aside file back once it is renamed.
        fs::rename(dir.path().join(&names[0]), &path).unwrap();
        let back = FileStore::open(&path, key("ab")).unwrap();
        assert_eq!(back.load("crm").await.unwrap(), Some(token(1)));
    }

    #[tokio::test]
    async fn a_tampered_store_is_set_aside_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        FileStore::open(&path, key("ab"))
            .unwrap()
            .save("crm", &token(1))
            .await
            .unwrap();
        // Flip one character of the sealed access token (base64 stays base64).
        let text = fs::read_to_string(&path).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        let sealed = doc["providers"]["crm"]["access_token"]
            .as_str()
            .unwrap()
            .to_owned();
        let mut altered = sealed.clone().into_bytes();
        let i = altered.len() / 2;
        altered[i] = if altered[i] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        fs::write(&path, text.replace(&sealed, &altered)).unwrap();

        let store = FileStore::open(&path, key("ab")).unwrap();
        assert_eq!(store.load("crm").await.unwrap(), None);
        let names = names_in(dir.path());
        assert!(names[0].starts_with("tokens.json.unreadable-"), "{names:?}");
    }

    #[tokio::test]
    async fn encrypted_store_without_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        FileStore::open(&path, key("ab"))
            .unwrap()
            .save("crm", &token(1))
            .await
            .unwrap();

        let err = FileStore::open(&path, None).unwrap_err();
        assert!(matches!(err, StoreError::Config(_)), "{err}");
        assert!(err.to_string().contains(crate::store::record::NO_KEY));
    }

    #[tokio::test]
    async fn plaintext_store_is_encrypted_once_a_key_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let plain = FileStore::open(&path, None).unwrap();
        plain.save("crm", &token(1)).await.unwrap();
        assert!(contains(&fs::read(&path).unwrap(), "access-secret-1"));

        let sealed = FileStore::open(&path, key("ab")).unwrap();
        assert_eq!(sealed.load("crm").await.unwrap(), Some(token(1)));
        // A save for another provider rewrites every record sealed.
        sealed.save("erp", &token(2)).await.unwrap();
        let bytes = fs::read(&path).unwrap();
        assert!(!contains(&bytes, "access-secret"), "all records sealed");
        assert!(!contains(&bytes, "refresh-secret"));
    }

    #[tokio::test]
    async fn corrupt_file_is_set_aside_and_store_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(&path, b"{\"version\": 1, \"providers\": {\"crm\": ").unwrap();

        let store = FileStore::open(&path, None).unwrap();
        assert_eq!(store.load("crm").await.unwrap(), None);
        let names = names_in(dir.path());
        assert_eq!(names.len(), 1, "{names:?}");
        assert!(names[0].starts_with("tokens.json.corrupt-"), "{names:?}");
        assert_eq!(
            fs::read(dir.path().join(&names[0])).unwrap(),
            b"{\"version\": 1, \"providers\": {\"crm\": ",
            "kept as it was, for the operator"
        );

        store.save("crm", &token(1)).await.unwrap();
        assert!(FileStore::open(&path, None).is_ok());
    }

    #[tokio::test]
    async fn unknown_version_is_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        fs::write(&path, br#"{"version": 2, "providers": {}, "shiny": true}"#).unwrap();

        let store = FileStore::open(&path, None).unwrap();
        assert_eq!(store.load("crm").await.unwrap(), None);
        assert!(!path.exists());
        assert!(names_in(dir.path())[0].starts_with("tokens.json.corrupt-"));
    }

    #[test]
    fn corruption_reason_never_quotes_the_file() {
        let reason = parse(
            br#"{"version": 1, "providers": {"crm": {"access_token": 5,
            "generation": "leaked-token-value"}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(!reason.contains("leaked"), "{reason}");
        assert!(reason.contains("line"), "{reason}");
        assert!(parse(b"[]").is_err());
        assert!(parse(b"").is_err());
        assert_eq!(
            parse(br#"{"providers": {}}"#).unwrap_err(),
            Damaged::NoVersion
        );
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn file_is_private_and_new_folder_is_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/tokens.json");
        let store = FileStore::open(&path, None).unwrap();
        store.save("crm", &token(1)).await.unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.path().join("state")), 0o700);
    }

    // The tests run as root here, and root ignores permission bits, so a chmod'ed
    // folder would still be writable. These paths fail for root too.
    #[cfg(unix)]
    #[test]
    fn folder_that_cannot_exist_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-folder");
        fs::write(&blocker, b"x").unwrap();
        // The store folder would have to be created inside a regular file.
        let path = blocker.join("state/tokens.json");
        let err = FileStore::open(&path, None).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&blocker.join("state").display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("cannot create the store folder"), "{msg}");
    }

    // /proc/self exists but no file can be created in it, whoever asks: this reaches
    // the write probe, not the folder creation.
    #[cfg(target_os = "linux")]
    #[test]
    fn unwritable_folder_is_an_error_naming_it() {
        let err = FileStore::open(Path::new("/proc/self/tokens.json"), None).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("/proc/self"), "{msg}");
        assert!(msg.contains("not writable"), "{msg}");
    }

    #[tokio::test]
    async fn save_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = FileStore::open(&path, key("ab")).unwrap();
        for gen in 1..=5 {
            store.save("crm", &token(gen)).await.unwrap();
        }
        assert_eq!(names_in(dir.path()), ["tokens.json"]);
    }

    #[tokio::test]
    async fn stale_temp_files_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let stale = dir.path().join("tokens.json.tmp-4000000000-0");
        fs::write(&stale, b"{\"half\": ").unwrap();
        FileStore::open(&path, None).unwrap();
        assert!(!stale.exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_saves_leave_a_valid_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let store = Arc::new(FileStore::open(&path, key("ab")).unwrap());
        let tasks: Vec<_> = (0..40u64)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    // Half write their own provider, half fight over one.
                    let provider = if i % 2 == 0 {
                        format!("p{i}")
                    } else {
                        "shared".into()
                    };
                    store.save(&provider, &token(i)).await.unwrap();
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }

        assert_eq!(names_in(dir.path()), ["tokens.json"]);
        let reopened = FileStore::open(&path, key("ab")).unwrap();
        for i in (0..40u64).step_by(2) {
            assert_eq!(
                reopened.load(&format!("p{i}")).await.unwrap(),
                Some(token(i))
            );
        }
        let shared = reopened.load("shared").await.unwrap().unwrap();
        assert_eq!(shared.generation % 2, 1);
        assert_eq!(
            store.load("shared").await.unwrap(),
            Some(shared),
            "memory and disk agree"
        );
    }

    #[test]
    fn debug_shows_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("tokens.json"), key("ab")).unwrap();
        store.shared.tokens().insert("crm".into(), token(1));
        let dbg = format!("{store:?}");
        assert!(!dbg.contains("secret"), "{dbg}");
        assert!(dbg.contains("encrypted: true"), "{dbg}");
    }
}
