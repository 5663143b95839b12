//! What a backup reads. Each source becomes a top-level name in the snapshot:
//! a directory tree (`path`), or the standard output of a command stored as one
//! file (`command`, e.g. `pg_dump -Fc db`), or the objects under an
//! object-store prefix (`object_store`, e.g. `s3://attachments/acme/`).

pub mod command;
pub mod object_store;
pub mod walk;

/// A source, as a tenant policy defines it.
pub use crate::config::SourceSpec as Source;

/// Where a source comes from (a directory, an argv, a URL), for reports.
pub fn origin(source: &Source) -> String {
    match source {
        Source::Path { path, .. } => path.display().to_string(),
        Source::Command { argv, .. } => argv.join(" "),
        Source::ObjectStore { url, .. } => url.clone(),
    }
}
