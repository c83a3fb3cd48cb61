//! The pin directory: one agent at a time holds it, and maps pinned by an agent of another
//! layout are refused rather than misread.

use std::path::Path;

use aya::maps::{Array, Map, MapData};
use draingate_common::MAP_LAYOUT;

use super::LoaderError;

/// Holds `pin_dir` for as long as the returned lock lives (an exclusive `flock` on the
/// directory; the kernel drops it when the process ends, however it ends). A second agent on
/// the same pins would zero slots the first still reads and turn its failing pods into passes:
/// it is refused, with the first one's pid.
pub(super) fn lock_pin_dir(
    pin_dir: &Path,
) -> Result<nix::fcntl::Flock<std::fs::File>, LoaderError> {
    use std::os::unix::fs::MetadataExt as _;
    let dir = std::fs::File::open(pin_dir).map_err(|source| LoaderError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })?;
    let inode = dir.metadata().map_or(0, |m| m.ino());
    nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| {
            if errno == nix::errno::Errno::EWOULDBLOCK {
                LoaderError::PinDirInUse {
                    pin_dir: pin_dir.to_owned(),
                    holder: lock_holder(inode),
                }
            } else {
                LoaderError::PinDir {
                    path: pin_dir.to_owned(),
                    source: errno.into(),
                }
            }
        },
    )
}

/// The pid holding an `flock` on inode `inode`, from `/proc/locks`
/// (`1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF`).
pub(super) fn lock_holder(inode: u64) -> Option<u32> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (kind, pid, file) = (words.get(1)?, words.get(4)?, words.get(5)?);
        (*kind == "FLOCK" && file.rsplit(':').next()?.parse::<u64>().ok()? == inode)
            .then(|| pid.parse().ok())?
    })
}

/// Refuses maps pinned under `pin_dir` by an agent of another [`MAP_LAYOUT`]; nothing pinned
/// is fine.
pub(super) fn check_pinned_layout(pin_dir: &Path) -> Result<(), LoaderError> {
    let pinned_gen = pin_dir.join("ADDR_GEN");
    if !pin_dir.join("SLOT_COUNTERS").exists() && !pinned_gen.exists() {
        return Ok(());
    }
    // Layouts before the stamp had a one-entry ADDR_GEN (or none): reading entry 1 fails.
    let pinned = MapData::from_pin(&pinned_gen)
        .ok()
        .and_then(|data| Array::<_, u64>::try_from(Map::Array(data)).ok())
        .and_then(|array| array.get(&1, 0).ok())
        .filter(|&layout| layout != 0);
    if pinned == Some(MAP_LAYOUT) {
        Ok(())
    } else {
        Err(LoaderError::PinnedLayout {
            pin_dir: pin_dir.to_owned(),
            pinned,
            expected: MAP_LAYOUT,
        })
    }
}
