//! The kernel's address table as user space builds it: every watched address, and the node's,
//! in the bucket the programs' lookups find it in.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use draingate_common::{
    ADDR_BUCKETS, ADDR_PROBE_BUCKETS, AddrBucket, AddrKey, addr_home, addr_words,
};

use super::LoaderError;

/// One generation of the kernel's address table, as user space writes it: the layout of
/// `draingate_common::AddrTable`.
pub(super) type AddrTableValue = [AddrBucket; ADDR_BUCKETS as usize];

/// Most node addresses the address table holds beside the pods'.
pub const MAX_NODE_ADDRS: usize = 256;

/// Builds the address table for `watched` and the node's addresses (`node`, under
/// `NODE_SLOT`; a pod's address wins where they overlap): each address in the first bucket from
/// its home on with a free cell, and each home bucket records how many buckets its lookups
/// scan.
pub(super) fn build_addr_table(
    watched: &BTreeMap<AddrKey, u32>,
    node: &BTreeSet<AddrKey>,
) -> Result<Box<AddrTableValue>, LoaderError> {
    let mut table: Box<AddrTableValue> = vec![AddrBucket::default(); ADDR_BUCKETS as usize]
        .into_boxed_slice()
        .try_into()
        .expect("ADDR_BUCKETS buckets");
    let mask = ADDR_BUCKETS - 1;
    let node = node
        .iter()
        .filter(|key| !watched.contains_key(key))
        .map(|key| (key, draingate_common::NODE_SLOT));
    for (key, slot) in watched.iter().map(|(key, &slot)| (key, slot)).chain(node) {
        let words = addr_words(key);
        if words == [0, 0] {
            // `::` marks an empty cell, and is no pod's address.
            continue;
        }
        let home = addr_home(words);
        let placed = (0..ADDR_PROBE_BUCKETS).find_map(|probe| {
            let bucket = &mut table[((home + probe) & mask) as usize];
            let cell = bucket.addr.iter().position(|a| *a == [0, 0])?;
            bucket.addr[cell] = words;
            bucket.slot[cell] = slot;
            Some(probe)
        });
        let Some(probe) = placed else {
            return Err(LoaderError::AddressTableFull {
                addr: IpAddr::from(*key),
            });
        };
        let home = &mut table[home as usize];
        home.probes = home.probes.max(probe + 1);
    }
    Ok(table)
}
