//! Member offsets of kernel structs, read from the running kernel's BTF
//! (`/sys/kernel/btf/vmlinux`).
//!
//! The programs read a few kernel struct fields where no tracepoint carries the fact (the
//! exiting process's live thread count before 6.16). Their offsets change with every kernel
//! build, so the loader looks them up here at load time and hands them to the programs as
//! globals, like the tracefs offsets. Only what that needs is parsed: the type section's
//! structs and unions and the string section. (aya-obj parses BTF but does not expose struct
//! members; btf-rs does, under the LGPL, which this Apache-2.0 project does not link.)

use std::{io, path::Path};

/// Where the kernel exposes its own BTF (kernels built with `CONFIG_DEBUG_INFO_BTF`).
pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
/// How deep anonymous structs and unions are followed to find a member.
const MAX_NESTING: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error(
        "cannot read this kernel's BTF at {path}, which draingate needs on kernels before 6.16 \
         (CONFIG_DEBUG_INFO_BTF, on in the kernels of every major distribution)"
    )]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("the kernel's BTF is malformed: {0}")]
    Malformed(&'static str),
    #[error("the kernel's BTF has no struct {0}")]
    NoStruct(String),
    #[error("struct {strukt} in the kernel's BTF has no member {member}")]
    NoMember { strukt: String, member: String },
    #[error("member {strukt}.{member} in the kernel's BTF is a bit field")]
    BitField { strukt: String, member: String },
}

/// One member of a struct or union: its name and type, and its offset in bits.
#[derive(Debug, Clone, Copy)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
    bitfield: bool,
}

/// One type of the type section, as far as this module needs it.
#[derive(Debug, Clone)]
struct Type {
    name: u32,
    kind: u32,
    members: Vec<Member>,
}

/// A parsed BTF blob: its types (by id, from 1) and strings.
#[derive(Debug)]
pub struct Btf {
    types: Vec<Type>,
    strings: Vec<u8>,
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    /// The running kernel's BTF.
    pub fn vmlinux() -> Result<Self, BtfError> {
        Self::read(Path::new(VMLINUX))
    }

    pub fn read(path: &Path) -> Result<Self, BtfError> {
        let data = std::fs::read(path).map_err(|source| BtfError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    /// Parses a little-endian BTF blob (the only byte order of the kernels draingate runs on).
    pub fn parse(data: &[u8]) -> Result<Self, BtfError> {
        let bad = BtfError::Malformed;
        if u16_at(data, 0) != Some(MAGIC) {
            return Err(bad("no BTF magic (or not little-endian)"));
        }
        let header = |at| u32_at(data, at).ok_or(bad("short header"));
        let hdr_len = header(4)? as usize;
        let (type_off, type_len) = (header(8)? as usize, header(12)? as usize);
        let (str_off, str_len) = (header(16)? as usize, header(20)? as usize);
        let section = |off: usize, len: usize| {
            let start = hdr_len.checked_add(off).ok_or(bad("section offset"))?;
            data.get(start..start.checked_add(len).ok_or(bad("section length"))?)
                .ok_or(bad("section beyond the data"))
        };
        let type_data = section(type_off, type_len)?;
        let strings = section(str_off, str_len)?.to_vec();

        let mut types = Vec::new();
        let mut at = 0;
        while at < type_data.len() {
            let word = |i: usize| u32_at(type_data, at + 4 * i).ok_or(bad("truncated type"));
            let (name, info) = (word(0)?, word(1)?);
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            at += 12;
            // What follows the common header, per kind (include/uapi/linux/btf.h).
            let extra = match kind {
                // int, var, decl tag: one u32.
                1 | 14 | 17 => 4,
                // ptr, fwd, typedef, volatile, const, restrict, func, float, type tag: none.
                2 | 7..=12 | 16 | 18 => 0,
                // array: element type, index type, count.
                3 => 12,
                // struct, union: vlen members of name, type, offset; datasec: vlen of type,
                // offset, size; enum64: vlen of name, lo32, hi32.
                KIND_STRUCT | KIND_UNION | 15 | 19 => 12 * vlen,
                // enum: vlen of name, value; func proto: vlen of name, type.
                6 | 13 => 8 * vlen,
                _ => return Err(bad("unknown type kind")),
            };
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for index in 0..vlen {
                    let member = |i: usize| {
                        u32_at(type_data, at + 12 * index + 4 * i).ok_or(bad("truncated member"))
                    };
                    let offset = member(2)?;
                    members.push(Member {
                        name: member(0)?,
                        type_id: member(1)?,
                        // With the kind flag, the top 8 bits are a bit field's size.
                        bit_offset: if kind_flag {
                            offset & 0x00ff_ffff
                        } else {
                            offset
                        },
                        bitfield: kind_flag && offset >> 24 != 0,
                    });
                }
            }
            at += extra;
            types.push(Type {
                name,
                kind,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or_default();
        rest.split(|&b| b == 0).next().unwrap_or_default()
    }

    fn type_by_id(&self, id: u32) -> Option<&Type> {
        self.types.get(usize::try_from(id).ok()?.checked_sub(1)?)
    }

    /// The byte offset of `member` in `struct strukt`, looking through anonymous structs and
    /// unions (as randomized or grouped layouts nest members).
    pub fn member_offset(&self, strukt: &str, member: &str) -> Result<u64, BtfError> {
        let ty = self
            .types
            .iter()
            .find(|t| {
                t.kind == KIND_STRUCT
                    && !t.members.is_empty()
                    && self.name(t.name) == strukt.as_bytes()
            })
            .ok_or_else(|| BtfError::NoStruct(strukt.to_owned()))?;
        let found = self.find_member(ty, member.as_bytes(), 0);
        match found {
            Some((bits, false)) if bits.is_multiple_of(8) => Ok(u64::from(bits / 8)),
            Some(_) => Err(BtfError::BitField {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            }),
            None => Err(BtfError::NoMember {
                strukt: strukt.to_owned(),
                member: member.to_owned(),
            }),
        }
    }

    /// The bit offset of `member` in `ty` and whether it is a bit field.
    fn find_member(&self, ty: &Type, member: &[u8], depth: usize) -> Option<(u32, bool)> {
        for m in &ty.members {
            if self.name(m.name) == member {
                return Some((m.bit_offset, m.bitfield));
            }
        }
        if depth >= MAX_NESTING {
            return None;
        }
        ty.members.iter().filter(|m| m.name == 0).find_map(|m| {
            let inner = self.type_by_id(m.type_id)?;
            if inner.kind != KIND_STRUCT && inner.kind != KIND_UNION {
                return None;
            }
            let (bits, bitfield) = self.find_member(inner, member, depth + 1)?;
            Some((m.bit_offset + bits, bitfield))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Btf, BtfError};

    /// A BTF blob with `struct outer { int a; union { int b; long c; }; }` (ids: 1 int,
    /// 2 outer, 3 the anonymous union).
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0b\0c\0";
        let name = |s: &str| {
            let needle = format!("\0{s}\0");
            u32::try_from(
                strings
                    .windows(needle.len())
                    .position(|w| w == needle.as_bytes())
                    .expect("name")
                    + 1,
            )
            .expect("small")
        };
        let mut types = Vec::new();
        let mut push = |words: &[u32]| types.extend(words.iter().flat_map(|w| w.to_le_bytes()));
        // int: name, info (kind 1), size, then the int encoding word.
        push(&[name("int"), 1 << 24, 4, 32]);
        // struct outer: 2 members.
        push(&[name("outer"), (4 << 24) | 2, 16]);
        push(&[name("a"), 1, 0]);
        push(&[0, 3, 64]);
        // union: 2 members at 0.
        push(&[0, (5 << 24) | 2, 8]);
        push(&[name("b"), 1, 0]);
        push(&[name("c"), 1, 0]);
        let mut data = Vec::new();
        data.extend(0xeb9f_u16.to_le_bytes());
        data.extend([1, 0]);
        let header = [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ];
        data.extend(header.iter().flat_map(|w| w.to_le_bytes()));
        data.extend(&types);
        data.extend(strings);
        data
    }

    #[test]
    fn members_are_found_directly_and_through_anonymous_unions() {
        let btf = Btf::parse(&blob()).expect("parses");
        assert_eq!(btf.member_offset("outer", "a").expect("a"), 0);
        assert_eq!(btf.member_offset("outer", "c").expect("c"), 8);
        assert!(matches!(
            btf.member_offset("outer", "d"),
            Err(BtfError::NoMember { .. })
        ));
        assert!(matches!(
            btf.member_offset("inner", "a"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn truncated_or_foreign_data_is_an_error_not_a_panic() {
        let data = blob();
        for len in 0..data.len() {
            let _ = Btf::parse(&data[..len]);
        }
        assert!(Btf::parse(b"not btf at all").is_err());
    }

    #[test]
    fn this_kernel_has_the_exit_fields_the_programs_read() {
        // Every kernel draingate runs on has BTF; the offsets are this build's.
        let btf = Btf::vmlinux().expect("this machine's kernel BTF");
        let signal = btf.member_offset("task_struct", "signal").expect("signal");
        let live = btf.member_offset("signal_struct", "live").expect("live");
        assert!(signal > 0 && signal.is_multiple_of(8), "{signal}");
        assert!(live.is_multiple_of(4), "{live}");
    }
}
