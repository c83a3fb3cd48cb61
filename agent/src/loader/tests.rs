use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use draingate_common::{
    ADDR_BUCKET_CELLS, ADDR_BUCKETS, ADDR_PROBE_BUCKETS, AddrKey, MAX_ADDRS, addr_home, addr_words,
};

use super::{AddrTableValue, LoaderError, build_addr_table};

/// The table of pod addresses only.
fn build_addr_table_pods(
    watched: &BTreeMap<AddrKey, u32>,
) -> Result<Box<AddrTableValue>, LoaderError> {
    build_addr_table(watched, &std::collections::BTreeSet::new())
}

/// The programs' lookup (`pod_of` in the eBPF crate), step for step.
fn lookup(table: &AddrTableValue, addr: IpAddr) -> Option<u32> {
    let words = addr_words(&AddrKey::from(addr));
    let home = addr_home(words);
    let probes = table[home as usize].probes.min(ADDR_PROBE_BUCKETS);
    (0..probes).find_map(|probe| {
        let bucket = &table[((home + probe) & (ADDR_BUCKETS - 1)) as usize];
        (0..ADDR_BUCKET_CELLS)
            .find(|&cell| bucket.addr[cell] == words)
            .map(|cell| bucket.slot[cell])
    })
}

fn watched(addrs: impl IntoIterator<Item = (IpAddr, u32)>) -> BTreeMap<AddrKey, u32> {
    addrs
        .into_iter()
        .map(|(addr, slot)| (AddrKey::from(addr), slot))
        .collect()
}

#[test]
fn a_full_node_of_addresses_is_found_and_nothing_else() {
    // As many addresses as the kernel record holds: a pod CIDR's IPv4 addresses in a row
    // and as many IPv6 ones, which is what a dual-stack node hands out.
    let half = MAX_ADDRS / 2;
    let addrs: Vec<(IpAddr, u32)> = (0..half)
        .flat_map(|i| {
            let [_, _, c, d] = i.to_be_bytes();
            [
                (IpAddr::V4(Ipv4Addr::new(10, 244, c, d)), i % 512),
                (
                    IpAddr::V6(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, i as u16)),
                    (i + 7) % 512,
                ),
            ]
        })
        .collect();
    let table = build_addr_table_pods(&watched(addrs.iter().copied())).expect("all placed");
    for &(addr, slot) in &addrs {
        assert_eq!(lookup(&table, addr), Some(slot), "{addr}");
    }
    // Addresses next to the watched ones, and `::`, find nothing.
    for i in half..half + 4096 {
        let [_, _, c, d] = i.to_be_bytes();
        assert_eq!(
            lookup(&table, IpAddr::V4(Ipv4Addr::new(10, 245, c, d))),
            None
        );
    }
    assert_eq!(lookup(&table, IpAddr::V6(Ipv6Addr::UNSPECIFIED)), None);
}

#[test]
fn slot_identities_are_nul_padded_and_cut_between_characters() {
    assert_eq!(super::nul_padded::<6>("web"), *b"web\0\0\0");
    // "é" is two bytes: the cut falls before it, not inside it.
    assert_eq!(super::nul_padded::<4>("abcé"), *b"abc\0");
    assert_eq!(super::nul_padded::<3>("abcdef"), *b"abc");
}

#[test]
fn an_empty_table_finds_nothing_and_the_unspecified_address_is_never_stored() {
    let table =
        build_addr_table_pods(&watched([(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 3)])).expect("built");
    assert!(table.iter().all(|b| b.probes == 0 && b.addr == [[0; 2]; 3]));
    assert_eq!(lookup(&table, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))), None);
}

#[test]
fn addresses_that_share_a_home_spill_over_and_the_first_that_finds_no_cell_is_named() {
    // Addresses whose home is bucket 0: the table places them in buckets 0..8, three each.
    let colliding: Vec<IpAddr> = (0u32..)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)))
        .filter(|addr| addr_home(addr_words(&AddrKey::from(*addr))) == 0)
        .take(ADDR_PROBE_BUCKETS as usize * ADDR_BUCKET_CELLS + 1)
        .collect();
    let (fit, over) = colliding.split_at(colliding.len() - 1);
    let table =
        build_addr_table_pods(&watched(fit.iter().map(|a| (*a, 9)))).expect("24 fit in 8 buckets");
    assert_eq!(table[0].probes, ADDR_PROBE_BUCKETS);
    for addr in fit {
        assert_eq!(lookup(&table, *addr), Some(9), "{addr}");
    }
    // The 25th cannot be placed within reach of a lookup: an error naming the address
    // (which one of the 25 that is depends on their order in the map).
    match build_addr_table_pods(&watched(colliding.iter().map(|a| (*a, 9)))) {
        Err(LoaderError::AddressTableFull { addr }) => {
            assert!(colliding.contains(&addr), "{addr}");
            assert_eq!(over.len(), 1);
        }
        other => panic!("expected AddressTableFull, got {:?}", other.map(|_| ())),
    }
}
