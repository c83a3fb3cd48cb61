//! Notable events from the kernel's ring buffer.

use draingate_common::NotableEvent;

/// Decodes one ring buffer record. `None` for a record of the wrong size (a build mismatch).
#[must_use]
pub fn decode(record: &[u8]) -> Option<NotableEvent> {
    if record.len() != size_of::<NotableEvent>() {
        return None;
    }
    // SAFETY: the length is checked, NotableEvent is plain data for which every bit pattern is
    // valid, and read_unaligned makes no alignment assumption.
    Some(unsafe { record.as_ptr().cast::<NotableEvent>().read_unaligned() })
}
