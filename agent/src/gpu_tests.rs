//! The GPU checks without a GPU: the verdicts on printed text, then the
//! whole check over the test harness's fake `nvidia-smi`
//! (`tests/fake/nvidia-smi`) and a kernel log file.

use super::*;

const HEALTHY: &str = "0, 00000000:00:1E.0, 0, No, [N/A], [N/A]\n";

#[test]
fn expected_counts_by_instance_type() {
    for (t, n) in [
        ("g4dn.xlarge", Some(1)),
        ("g4dn.12xlarge", Some(4)),
        ("g4dn.metal", Some(8)),
        ("g5.2xlarge", Some(1)),
        ("g5.24xlarge", Some(4)),
        ("g6.48xlarge", Some(8)),
        ("g5g.16xlarge", Some(2)),
        ("p3.8xlarge", Some(4)),
        ("p4d.24xlarge", Some(8)),
        ("p5.48xlarge", Some(8)),
        ("p5.4xlarge", Some(1)),
        ("p5e.48xlarge", Some(8)),
        ("p3dn.24xlarge", Some(8)),
        ("g6e.12xlarge", Some(4)),
        // Unknown sizes are not guessed.
        ("p5.2xlarge", None),
        ("g4dn.32xlarge", None),
        ("c5.large", None),
        ("g4dn", None),
    ] {
        assert_eq!(expected_gpus(t), n, "{t}");
    }
}

#[test]
fn the_query_is_read_and_judged() {
    let gpus = parse_query(HEALTHY).unwrap();
    assert_eq!(gpus[0].bus, "00000000:00:1E.0");
    assert_eq!(gpus[0].ecc_uncorrected, Some(0));
    assert_eq!(gpus[0].remap_failed, None, "[N/A] on a T4");
    let ok = judge(&gpus, Some(1), true);
    assert!(ok.ok(), "{ok:?}");
    assert_eq!(ok.checks, [("gpu_count", true), ("gpu_memory", true)]);
    // One GPU of four gone: jobs would still start.
    let o = judge(&gpus, Some(4), true);
    assert_eq!(o.checks[0], ("gpu_count", false));
    assert!(o.lasting);
    assert!(o
        .failure
        .unwrap()
        .contains("1 GPU(s) listed by nvidia-smi, 4 expected"));
    // No expectation: any GPU passes, none fails.
    assert!(judge(&gpus, None, true).ok());
    assert!(!judge(&[], None, true).ok());
    // A remapping pending does not affect new work (NVML): it passes.
    assert!(judge(
        &parse_query("0, b, 0, [N/A], Yes, No").unwrap(),
        Some(1),
        true
    )
    .ok());
    // An A100's remapped rows read as integers: 0 passes, 1 is a failure.
    assert!(judge(&parse_query("0, b, 0, [N/A], 0, 0").unwrap(), Some(1), true).ok());
    let o = judge(&parse_query("0, b, 0, [N/A], 0, 1").unwrap(), Some(1), true);
    assert_eq!(o.failure.as_deref(), Some("GPU b: a row remapping failure"));
    // A field reading the GPU's own error is an error, not "not available".
    for line in [
        "0, b, [Unknown Error], No, No, No",
        "0, b, 0, [GPU requires reset], No, No",
        "0, b, 0, No, No, Maybe",
    ] {
        let e = parse_query(line).unwrap_err();
        assert!(e.starts_with("GPU b: field"), "{line}: {e}");
    }
    for (line, why) in [
        ("0, b, 3, No, No, No", "3 uncorrectable ECC error(s)"),
        ("0, b, 0, Yes, [N/A], [N/A]", "a page retirement pending"),
        ("0, b, 0, [N/A], No, Yes", "a row remapping failure"),
    ] {
        let o = judge(&parse_query(line).unwrap(), Some(1), true);
        assert_eq!(
            o.checks,
            [("gpu_count", true), ("gpu_memory", false)],
            "{line}"
        );
        assert!(o.lasting);
        assert_eq!(o.failure.as_deref(), Some(format!("GPU b: {why}").as_str()));
    }
    // Memory fields not queried (an older driver): no memory verdict.
    let o = judge(&parse_query("0, b").unwrap(), Some(1), false);
    assert_eq!(o.checks, [("gpu_count", true)]);
    let e = parse_query("No devices were found").unwrap_err();
    assert!(e.contains("unreadable line"), "{e}");
}

#[test]
fn fatal_xids_fail_and_application_ones_do_not() {
    let kmsg = "4,1602,8812345,-;NVRM: Xid (PCI:0000:00:1e): 79, pid=1234, name=python, GPU has fallen off the bus.\n";
    assert_eq!(xids_in(kmsg), [(79, "0000:00:1e".to_string())]);
    let dmesg = "[  812.3] NVRM: Xid (PCI:0000:01:00 GPU-I:05): 94, pid=7194, Contained: CE User Channel (0x9). RST: No, D-RST: No\n[  900.0] NVRM: Xid (PCI:0000:01:00): 13, pid=1, Graphics Exception\nnot an Xid line\n";
    assert_eq!(
        xids_in(dmesg),
        [
            (94, "0000:01:00".to_string()),
            (13, "0000:01:00".to_string())
        ]
    );
    let o = judge_xids(&xids_in(kmsg));
    assert_eq!(o.checks, [("gpu_xid", false)]);
    assert!(o.lasting);
    assert!(o
        .failure
        .unwrap()
        .contains("Xid 79 on GPU 0000:00:1e (the GPU has fallen off the bus)"));
    // An application's fault (13) and a recorded remapping (63) pass.
    assert!(judge_xids(&[(13, "a".into()), (63, "a".into())]).ok());
    // The driver asking for a reset (154) fails; going back to None does not.
    let reset = "NVRM: Xid (PCI:0000:00:1e): 154, GPU recovery action changed from 0x0 (None) to 0x1 (GPU Reset Required)\n";
    assert!(!judge_xids(&xids_in(reset)).ok());
    let clear = "NVRM: Xid (PCI:0000:00:1e): 154, GPU recovery action changed from 0x1 (GPU Reset Required) to 0x0 (None)\n";
    assert!(xids_in(clear).is_empty());
}

/// The harness's fake `nvidia-smi`, linked into a directory of its own,
/// answering as `mode`, for an instance of `gpus` GPUs.
fn fake_smi(name: &str, mode: &str, gpus: u32) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sg-gpu-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let smi = dir.join("nvidia-smi");
    // A link, not a copy: an executable written while another test forks
    // cannot be run (ETXTBSY); `$0` is still this directory's.
    let _ = std::fs::remove_file(&smi);
    std::os::unix::fs::symlink(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fake/nvidia-smi"),
        &smi,
    )
    .unwrap();
    std::fs::write(dir.join("mode"), mode).unwrap();
    std::fs::write(dir.join("gpus"), gpus.to_string()).unwrap();
    smi
}

#[tokio::test]
async fn the_check_over_a_fake_nvidia_smi() {
    let run = |name: &'static str, mode: &'static str, gpus: u32, expected: Option<u32>| async move {
        GpuCheck::new(fake_smi(name, mode, gpus), expected, None)
            .check()
            .await
    };
    let o = run("healthy", "healthy", 4, Some(4)).await;
    assert!(o.ok(), "{o:?}");
    assert_eq!(
        o.checks,
        [
            ("gpu_answers", true),
            ("gpu_count", true),
            ("gpu_memory", true)
        ]
    );
    let o = run("missing", "missing", 4, Some(4)).await;
    assert_eq!(o.checks[1], ("gpu_count", false));
    assert!(o.lasting && o.failure.unwrap().contains("3 GPU(s)"));
    let o = run("ecc", "ecc", 1, Some(1)).await;
    assert_eq!(o.checks[2], ("gpu_memory", false));
    assert!(o.failure.unwrap().contains("2 uncorrectable ECC error(s)"));
    let o = run("retire", "retire", 1, None).await;
    assert!(o.failure.unwrap().contains("a page retirement pending"));
    // The driver down: closes intake at once, lasting only on the third
    // check in a row (a slow first query, a check racing the driver's start).
    let c = GpuCheck::new(fake_smi("driver", "driver", 1), Some(1), None);
    for n in 1..=3 {
        let o = c.check().await;
        assert_eq!(o.checks, [("gpu_answers", false)]);
        assert_eq!(o.lasting, n == 3, "check {n}");
        assert!(
            o.failure
                .unwrap()
                .contains("couldn't communicate with the NVIDIA driver"),
            "the driver's own words"
        );
    }
    // An answer in between starts the count again.
    let smi = fake_smi("flaky", "driver", 1);
    let c = GpuCheck::new(smi.clone(), Some(1), None);
    assert!(!c.check().await.lasting);
    assert!(!c.check().await.lasting);
    std::fs::write(smi.parent().unwrap().join("mode"), "healthy").unwrap();
    assert!(c.check().await.ok());
    std::fs::write(smi.parent().unwrap().join("mode"), "driver").unwrap();
    assert!(!c.check().await.lasting, "the count started again");
    // A driver without the memory fields: counted, memory left out.
    let o = run("old", "old-driver", 2, Some(2)).await;
    assert!(o.ok(), "{o:?}");
    assert_eq!(o.checks, [("gpu_answers", true), ("gpu_count", true)]);
    let o = GpuCheck::new(PathBuf::from("/nonexistent/nvidia-smi"), Some(1), None)
        .check()
        .await;
    assert!(o.failure.unwrap().contains("cannot start"));
    // A GPU error in a field: the memory check, lasting at once.
    let o = run("gpuerr", "unknown-error", 1, Some(1)).await;
    assert_eq!(o.checks, [("gpu_answers", true), ("gpu_memory", false)]);
    assert!(o.lasting && o.failure.unwrap().contains("[Unknown Error]"));
}

#[tokio::test]
async fn a_hung_nvidia_smi_fails_at_the_bound() {
    let mut c = GpuCheck::new(fake_smi("hang", "hang", 1), Some(1), None);
    c.timeout = Duration::from_millis(300);
    let t0 = std::time::Instant::now();
    let o = c.check().await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(o.checks, [("gpu_answers", false)]);
    assert!(!o.lasting, "not on the first hang");
    assert!(o.failure.unwrap().contains("did not answer within 300ms"));
    c.check().await;
    assert!(c.check().await.lasting, "the third hang in a row");
}

#[tokio::test]
async fn xid_events_are_read_from_the_kernel_log_as_they_come() {
    let dir = std::env::temp_dir().join(format!("sg-kmsg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("kmsg");
    std::fs::write(
        &log,
        "6,1,100,-;NVRM: loading NVIDIA UNIX x86_64 Kernel Module\n4,2,200,-;NVRM: Xid (PCI:0000:00:1e): 13, pid=9, Graphics Exception\n",
    )
    .unwrap();
    let c = GpuCheck::new(
        fake_smi("kmsg", "healthy", 1),
        Some(1),
        Some(KernelSource::File(log.clone())),
    );
    let o = c.check().await;
    assert!(o.ok(), "{o:?}");
    assert!(o.checks.contains(&("gpu_xid", true)));
    // The GPU falls off the bus: the next check sees only the new record.
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    writeln!(
        f,
        "4,3,300,-;NVRM: Xid (PCI:0000:00:1e): 79, pid=9, GPU has fallen off the bus."
    )
    .unwrap();
    let o = c.check().await;
    assert!(o.checks.contains(&("gpu_xid", false)));
    assert!(o.lasting && o.failure.unwrap().contains("Xid 79"));
    // And it stays: the event is since boot, not since the last look.
    assert!(!c.check().await.ok());
    // A log that cannot be read leaves the Xid check out, not failing.
    let c = GpuCheck::new(
        fake_smi("nolog", "healthy", 1),
        Some(1),
        Some(KernelSource::File(dir.join("missing"))),
    );
    let o = c.check().await;
    assert!(o.ok());
    assert!(!o.checks.iter().any(|c| c.0 == "gpu_xid"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_journals_kernel_messages_are_read() {
    let out = "NVRM: loading NVIDIA UNIX x86_64 Kernel Module\nNVRM: Xid (PCI:0000:00:1e): 79, pid=9, GPU has fallen off the bus.\n-- cursor: s=abc;i=12;b=def\n";
    assert_eq!(journal_read(out), [(79, "0000:00:1e".to_string())]);
    assert_eq!(journal_read(""), vec![]);
    assert_eq!(KernelSource::of("journal"), Some(KernelSource::Journal));
    assert_eq!(KernelSource::of(""), None);
    assert_eq!(
        KernelSource::of("/dev/kmsg"),
        Some(KernelSource::File("/dev/kmsg".into()))
    );
}
