//! The typed control client against the mock in process.

use spotguard_imds_mock::control::{Control, ControlError, Fault};
use spotguard_imds_mock::MockConfig;

#[tokio::test]
async fn the_control_client_sets_notices_and_faults_and_reads_counts() {
    let (addr, _server) = spotguard_imds_mock::spawn(MockConfig::default())
        .await
        .unwrap();
    let ctl = Control::new(format!("http://{addr}"));
    // Blocking calls, off the runtime that serves the mock.
    let out = tokio::task::spawn_blocking(move || {
        let notice = ctl.spot_interruption("stop", 90).unwrap();
        assert_eq!(notice["action"], "stop");
        // The notice is served (IMDSv1 refused: the token comes first).
        let (status, _) = ctl
            .raw("GET", "/latest/meta-data/spot/instance-action", "")
            .unwrap();
        assert_eq!(status, 401);
        ctl.fault(&Fault {
            status: Some(500),
            count: 2,
            ..Fault::default()
        })
        .unwrap();
        for _ in 0..2 {
            let (status, _) = ctl.raw("PUT", "/latest/api/token", "").unwrap();
            assert_eq!(status, 500);
        }
        let counts = ctl.requests().unwrap();
        assert_eq!(counts.count("PUT", "/latest/api/token", 500), 2);
        assert_eq!(counts.total, 3);
        // A refused control request is an error with the mock's reason.
        let e = ctl
            .fault(&Fault {
                count: 1,
                ..Fault::default()
            })
            .unwrap_err();
        assert!(
            matches!(&e, ControlError::Status { status: 400, body, .. } if body.contains("status")),
            "{e}"
        );
        ctl.reset().unwrap();
        ctl.requests().unwrap().total
    })
    .await
    .unwrap();
    assert_eq!(out, 0, "reset clears the counts");
}
