//! The benchmark's floor: empty programs attached beside the agent's, whose kernel time per run
//! is what any program there costs before it does anything. They are an object of their own
//! ([`FLOOR_OBJECT`]), which the agent's binary does not embed: the benchmark runs on the
//! machine that built it and loads the object from the build's output directory.

use std::path::Path;

use aya::{
    Ebpf,
    programs::{
        ProgramError,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcAttachType},
    },
};

use super::{
    HOOKS, KernelProbes, LoaderError, TC_PRIORITY, attach_error, classifier, classify, interfaces,
    load_and_attach,
};

/// Where the build put the benchmark's object (`floor` on tracepoints, `tc_floor` on TC), built
/// by `build.rs` beside the agent's from `agent-ebpf/src/bin/floor.rs`.
pub const FLOOR_OBJECT: &str = concat!(env!("OUT_DIR"), "/draingate-floor");

/// The benchmark's object, loaded (its programs not yet).
fn load_floor_object() -> Result<Ebpf, LoaderError> {
    let object = std::fs::read(FLOOR_OBJECT).map_err(|source| LoaderError::FloorMissing {
        path: FLOOR_OBJECT,
        source,
    })?;
    Ebpf::load(&object).map_err(|err| {
        classify(err, "load eBPF programs", |source| LoaderError::FloorLoad {
            path: FLOOR_OBJECT,
            source: Box::new(source),
        })
    })
}

/// The benchmark's empty program on each hook, attached while this lives.
pub struct FloorProbe {
    _objects: Vec<Ebpf>,
    ids: Vec<(&'static str, u32)>,
}

impl FloorProbe {
    /// The kernel's id of the empty program on each hook, by the name of the agent's program
    /// there (`inet_sock_set_state`, `tcp_send_reset`, ...).
    #[must_use]
    pub fn program_ids(&self) -> &[(&'static str, u32)] {
        &self.ids
    }
}

/// The benchmark's empty TC program, attached while this lives.
pub struct TcFloor {
    _ebpf: Ebpf,
    /// The namespace of the interfaces the filters are on: they are detached from inside it
    /// (their interface indexes are that namespace's).
    netns: std::fs::File,
    links: Vec<SchedClassifierLink>,
    id: u32,
}

impl Drop for TcFloor {
    fn drop(&mut self) {
        let links = std::mem::take(&mut self.links);
        let netns = &self.netns;
        std::thread::scope(|scope| {
            scope.spawn(move || {
                if nix::sched::setns(netns, nix::sched::CloneFlags::CLONE_NEWNET).is_ok() {
                    // Dropping a netlink link deletes its filter.
                    drop(links);
                } else {
                    // Deleting by index outside the namespace could hit another interface:
                    // leave the filters; they go with the namespace.
                    std::mem::forget(links);
                }
            });
        });
    }
}

impl TcFloor {
    /// The kernel's id of the empty program.
    #[must_use]
    pub fn program_id(&self) -> u32 {
        self.id
    }
}

impl std::fmt::Debug for TcFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcFloor")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for FloorProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FloorProbe").finish_non_exhaustive()
    }
}

impl KernelProbes {
    /// The empty `floor` program on every tracepoint the agent uses, for the benchmark: its
    /// kernel time per run on a tracepoint is the fixed cost of any program there. Each hook
    /// gets its own copy of the program, so that each has its own statistics
    /// ([`FloorProbe::program_ids`]). The floor's object has no maps, so nothing is pinned;
    /// dropping the returned value detaches the programs.
    pub fn attach_floor() -> Result<FloorProbe, LoaderError> {
        let mut objects = Vec::new();
        let mut ids = Vec::new();
        for hook in HOOKS {
            let mut ebpf = load_floor_object()?;
            let (program, _) = load_and_attach(&mut ebpf, "floor", hook)?;
            let id = program
                .info()
                .map_err(|source| attach_error(hook, source))?
                .id();
            ids.push((hook.program, id));
            objects.push(ebpf);
        }
        Ok(FloorProbe {
            _objects: objects,
            ids,
        })
    }

    /// The empty TC program `tc_floor` on every interface but loopback of the network
    /// namespace at `netns`, on egress, after the packet program (a lower priority), for the
    /// benchmark: its kernel time per packet is the fixed cost of any TC program there.
    /// Dropping the returned value detaches it.
    pub fn attach_tc_floor(netns: &Path) -> Result<TcFloor, LoaderError> {
        let mut ebpf = load_floor_object()?;
        let tc_error = |source: ProgramError| LoaderError::Tc {
            interface: String::new(),
            source: Box::new(source),
        };
        let program = classifier(&mut ebpf, "tc_floor")?;
        program.load().map_err(tc_error)?;
        let id = program.info().map_err(tc_error)?.id();
        let file = std::fs::File::open(netns).map_err(|source| LoaderError::Netns {
            path: netns.to_owned(),
            source,
        })?;
        let links = crate::netns::run_in(&file, || {
            let mut links = Vec::new();
            for (_, name) in interfaces(|name| name != "lo") {
                let options = TcAttachOptions::Netlink(NlOptions {
                    priority: TC_PRIORITY + 1,
                    ..NlOptions::default()
                });
                let id = program
                    .attach_with_options(&name, TcAttachType::Egress, options)
                    .map_err(|source| LoaderError::Tc {
                        interface: name.clone(),
                        source: Box::new(source),
                    })?;
                links.push(program.take_link(id).map_err(tc_error)?);
            }
            Ok::<_, LoaderError>(links)
        })
        .map_err(|source| LoaderError::Netns {
            path: netns.to_owned(),
            source,
        })??;
        Ok(TcFloor {
            _ebpf: ebpf,
            netns: file,
            links,
            id,
        })
    }
}
