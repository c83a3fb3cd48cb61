use super::{Field, TracefsError, TracepointFormat};

/// `sock:inet_sock_set_state` as Linux 6.18 prints it.
const INET_SOCK_SET_STATE: &str = "name: inet_sock_set_state
ID: 1520
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:26;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 protocol;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:40;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s protocol=%s sport=%hu dport=%hu saddr=%pI4 daddr=%pI4 saddrv6=%pI6c\"
";

/// `tcp:tcp_send_reset` before 6.10: no `reason`, so `saddr` sits 8 bytes earlier than today.
const TCP_SEND_RESET_6_1: &str = "name: tcp_send_reset
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
";

#[test]
fn reads_offsets_of_scalar_array_and_pointer_fields() {
    let format =
        TracepointFormat::parse("sock:inet_sock_set_state".into(), INET_SOCK_SET_STATE).unwrap();
    assert_eq!(format.fields.len(), 15);
    assert_eq!(format.offset("newstate").unwrap(), 20);
    assert_eq!(format.offset("saddr").unwrap(), 32);
    assert_eq!(format.offset("saddr_v6").unwrap(), 40);
    assert_eq!(format.offset("skaddr").unwrap(), 8);
    assert_eq!(
        format.fields[12],
        Field {
            name: "daddr".into(),
            offset: 36,
            size: 4
        }
    );
}

#[test]
fn a_missing_field_is_an_error_naming_tracepoint_and_field() {
    let format = TracepointFormat::parse("tcp:tcp_send_reset".into(), TCP_SEND_RESET_6_1).unwrap();
    assert_eq!(format.offset("state").unwrap(), 24);
    let err = format.offset("reason").unwrap_err();
    assert!(matches!(err, TracefsError::MissingField { .. }));
    assert_eq!(
        err.to_string(),
        "tracepoint tcp:tcp_send_reset has no field `reason` on this kernel"
    );
}

#[test]
fn a_malformed_field_line_is_reported_with_its_line_number() {
    let text = "format:\n\tfield:int newstate;\toffset:x;\tsize:4;\tsigned:1;\n";
    let err = TracepointFormat::parse("sock:x".into(), text).unwrap_err();
    assert!(
        matches!(err, TracefsError::Malformed { line: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn a_missing_tracepoint_names_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("events")).unwrap();
    let err = TracepointFormat::read(dir.path(), "tcp", "tcp_nonexistent").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("this kernel has no tracepoint tcp:tcp_nonexistent"),
        "{err}"
    );
}

#[test]
fn the_compiled_in_set_state_layout_is_recognised_and_any_difference_is_not() {
    use draingate_common::set_state_layout::FIELDS;
    let format = TracepointFormat::parse("sock:inet_sock_set_state".into(), INET_SOCK_SET_STATE)
        .expect("parse");
    assert!(format.has_layout(&FIELDS));
    // A field moved, resized or gone: the program that takes offsets from tracefs is used.
    for (from, to) in [
        ("offset:28;\tsize:2", "offset:44;\tsize:2"),
        ("offset:24;\tsize:2", "offset:24;\tsize:4"),
        ("__u16 protocol;", "__u16 proto;"),
    ] {
        assert!(INET_SOCK_SET_STATE.contains(from), "{from}");
        let changed = INET_SOCK_SET_STATE.replacen(from, to, 1);
        let format =
            TracepointFormat::parse("sock:inet_sock_set_state".into(), &changed).expect("parse");
        assert!(!format.has_layout(&FIELDS), "{from} -> {to}");
    }
}
