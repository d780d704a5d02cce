//! Errors print each cause once (tests only).
//!
//! An error that writes its cause into its own message (`#[error("...: {0}")]`) must not also
//! return it as `source()`: an anyhow-style chain (`{e:#}`, `main`'s "error: ...") prints the
//! message, then every source, so the cause would appear twice. One test per error type that
//! carries a cause renders the whole chain and counts the cause's text.

use std::sync::Arc;

/// `{:#}` of the error through anyhow: the message, then each source after ": ".
fn chain(error: impl std::error::Error + Send + Sync + 'static) -> String {
    format!("{:#}", anyhow::Error::new(error))
}

fn assert_once(rendered: &str, cause: &str) {
    assert_eq!(
        rendered.matches(cause).count(),
        1,
        "{cause:?} once in {rendered:?}"
    );
}

fn disk_full() -> std::io::Error {
    std::io::Error::from_raw_os_error(libc::ENOSPC)
}

#[test]
fn storage_error_prints_its_io_error_once() {
    let cause = disk_full().to_string();
    let io = crate::engine::StorageError::Io {
        what: "append WAL",
        error: disk_full(),
    };
    assert_once(&chain(io), &cause);
    let seq = 7;
    let snapshot = crate::engine::StorageError::Snapshot {
        what: "write",
        seq,
        error: disk_full(),
    };
    assert_once(&chain(snapshot), &cause);
}

#[test]
fn engine_error_prints_its_storage_error_once() {
    let storage = crate::engine::StorageError::Io {
        what: "append WAL",
        error: disk_full(),
    };
    let rendered = chain(crate::engine::EngineError::Fatal(Arc::new(storage)));
    assert_once(&rendered, "append WAL");
    assert_once(&rendered, &disk_full().to_string());
}

#[test]
fn state_error_prints_its_pool_error_once() {
    let pool = crate::pool::PoolError::Invalid("weights overflow".to_owned());
    assert_once(
        &chain(crate::state::StateError::from(pool)),
        "weights overflow",
    );
}

#[test]
fn batch_error_prints_its_record_error_once() {
    let error = crate::record::DecodeError::UnknownKind(9);
    let rendered = chain(crate::wal::BatchError::Record { at: 12, error });
    assert_once(&rendered, "unknown record kind 9");
}

#[test]
fn config_read_error_prints_its_io_error_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let error = crate::config::Config::load_with_env(Some(dir.path()), &[]).expect_err("a dir");
    let crate::config::ConfigError::FileRead { error: io, .. } = &error else {
        panic!("expected a read error, got {error:?}");
    };
    let cause = io.to_string();
    assert_once(&chain(error), &cause);
}
