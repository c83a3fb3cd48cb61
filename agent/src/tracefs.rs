//! Tracepoint record layouts, read from tracefs at load time.
//!
//! Field offsets change between kernels (`tcp:tcp_send_reset` gained `reason` in 6.10), so the
//! kernel programs carry none: the loader reads `events/<category>/<name>/format` and hands each
//! offset to the programs as a global.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

/// Where tracefs is mounted on current kernels, and where older setups reach it through debugfs.
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error(
        "tracefs is not mounted (looked for events/ under {roots}); mount it with \
         `mount -t tracefs nodev /sys/kernel/tracing`",
        roots = TRACEFS_ROOTS.join(" and ")
    )]
    NotMounted,
    #[error(
        "this kernel has no tracepoint {tracepoint}, which draingate needs to count connections \
         (reading {path})"
    )]
    MissingTracepoint {
        tracepoint: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "not permitted to read {path}: the agent runs as uid 0 (tracefs is root's) with CAP_BPF \
         and CAP_PERFMON"
    )]
    PermissionDenied {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tracepoint {tracepoint} has no field `{field}` on this kernel")]
    MissingField { tracepoint: String, field: String },
    #[error("cannot parse line {line} of the format of {tracepoint}: {text:?}")]
    Malformed {
        tracepoint: String,
        line: usize,
        text: String,
    },
}

/// One field of a tracepoint record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// The record layout of one tracepoint, as its `format` file describes it.
#[derive(Debug, Clone)]
pub struct TracepointFormat {
    /// `category:name`, for messages.
    pub tracepoint: String,
    pub fields: Vec<Field>,
}

/// The tracefs mount point, or a clear error that says how to mount it.
pub fn root() -> Result<PathBuf, TracefsError> {
    for root in TRACEFS_ROOTS.iter().map(PathBuf::from) {
        let events = root.join("events");
        match fs::metadata(&events) {
            Ok(meta) if meta.is_dir() => return Ok(root),
            Err(source) if source.kind() == io::ErrorKind::PermissionDenied => {
                return Err(TracefsError::PermissionDenied {
                    path: events,
                    source,
                });
            }
            _ => {}
        }
    }
    Err(TracefsError::NotMounted)
}

impl TracepointFormat {
    /// Reads `events/<category>/<name>/format` under the tracefs `root`.
    pub fn read(root: &Path, category: &str, name: &str) -> Result<Self, TracefsError> {
        let tracepoint = format!("{category}:{name}");
        let path = root.join("events").join(category).join(name).join("format");
        let text = fs::read_to_string(&path).map_err(|source| {
            if source.kind() == io::ErrorKind::PermissionDenied {
                TracefsError::PermissionDenied {
                    path: path.clone(),
                    source,
                }
            } else {
                TracefsError::MissingTracepoint {
                    tracepoint: tracepoint.clone(),
                    path: path.clone(),
                    source,
                }
            }
        })?;
        Self::parse(tracepoint, &text)
    }

    /// Parses the text of a `format` file. Only `field:` lines matter; the print format is ignored.
    pub fn parse(tracepoint: String, text: &str) -> Result<Self, TracefsError> {
        let mut fields = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if !line.starts_with("field:") {
                continue;
            }
            let malformed = || TracefsError::Malformed {
                tracepoint: tracepoint.clone(),
                line: index + 1,
                text: line.to_owned(),
            };
            let field = parse_field(line).ok_or_else(malformed)?;
            fields.push(field);
        }
        Ok(Self { tracepoint, fields })
    }

    /// Whether each of `fields` (name, offset, size) is in the record exactly so.
    #[must_use]
    pub fn has_layout(&self, fields: &[(&str, usize, usize)]) -> bool {
        fields.iter().all(|&(name, offset, size)| {
            self.fields.iter().any(|f| {
                f.name == name
                    && usize::try_from(f.offset) == Ok(offset)
                    && usize::try_from(f.size) == Ok(size)
            })
        })
    }

    /// The field named `name`, if the record has it.
    #[must_use]
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// The offset of `field` in the record, or an error that names the tracepoint and field.
    pub fn offset(&self, field: &str) -> Result<u64, TracefsError> {
        self.fields
            .iter()
            .find(|f| f.name == field)
            .map(|f| f.offset)
            .ok_or_else(|| TracefsError::MissingField {
                tracepoint: self.tracepoint.clone(),
                field: field.to_owned(),
            })
    }
}

/// `field:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;` → `saddr` at 32, 4 bytes.
fn parse_field(line: &str) -> Option<Field> {
    let mut parts = line.split(';').map(str::trim);
    let declaration = parts.next()?.strip_prefix("field:")?;
    // The name is the declaration's last word, without an array suffix: `const void * skaddr`,
    // `__u8 saddr_v6[16]`, `enum sk_rst_reason reason`.
    let last = declaration.rsplit([' ', '*']).next()?;
    let name = last.split('[').next()?.trim();
    if name.is_empty() {
        return None;
    }
    let mut offset = None;
    let mut size = None;
    for part in parts {
        if let Some(value) = part.strip_prefix("offset:") {
            offset = value.parse().ok();
        } else if let Some(value) = part.strip_prefix("size:") {
            size = value.parse().ok();
        }
    }
    Some(Field {
        name: name.to_owned(),
        offset: offset?,
        size: size?,
    })
}

#[cfg(test)]
mod tests;
