//! A config file as an operator writes it: layered over the embedded defaults, and `config
//! check` failing on what would silently bill nothing, saying what to change.

use crate::support::{arg, run_cli};

fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_config_with_only_a_bus_section_bills_the_fixtures_as_the_embedded_default_does() {
    let dir = tempfile::tempdir().unwrap();
    let only_bus = file(&dir, "bus.toml", "[bus]\nurl = \"amqp://billing:pw@rabbit.example:5672/%2f\"\n");
    let default = run_cli(&["replay", "--report", "json", "fixtures/"]);
    let layered = run_cli(&["--config", arg(&only_bus), "replay", "--report", "json", "fixtures/"]);
    assert!(!default.stdout.is_empty());
    assert_eq!(layered.stdout, default.stdout, "{}", String::from_utf8_lossy(&layered.stderr));
    let check = run_cli(&["--config", arg(&only_bus), "config", "check"]);
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stderr));
    let shown = String::from_utf8_lossy(&check.stdout);
    // Every default binding is kept, and the file's password is not shown.
    assert_eq!(shown.matches("[[bus.bindings]]").count(), 9, "{shown}");
    assert!(shown.contains("billing:***@rabbit.example") && !shown.contains("pw@"), "{shown}");
}

#[test]
fn config_check_fails_on_each_trap_saying_what_to_change() {
    let dir = tempfile::tempdir().unwrap();
    let traps = [
        (
            "[billing.meters.\"vcpu\"]\nunit = \"openstack-vcpu-seconds\"\nfactor = \"1\"\ncounter = \"delta\"\n",
            "billing.meters.\"vcpu\": Ceilometer emits no meter by that name",
        ),
        ("[billing]\ndefault_plan = \"openstack-gold-monthly\"\n", "does not declare plan openstack-gold-monthly"),
        (
            "[billing.meters.\"cpu\"]\nunit = \"openstack-cpu-ns\"\nfactor = \"1\"\ncounter = \"cumulative\"\n",
            "does not declare unit openstack-cpu-ns",
        ),
        ("[billing.resources]\nvolume_plan = \"openstack-disk-monthly\"\n", "plan openstack-disk-monthly"),
    ];
    for (n, (text, says)) in traps.iter().enumerate() {
        let config = file(&dir, &format!("trap-{n}.toml"), text);
        let out = run_cli(&["--config", arg(&config), "config", "check"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert!(stderr.contains(says), "{text}: {stderr}");
        assert!(stderr.contains("would not bill what it says"), "{stderr}");
        assert!(out.stdout.is_empty(), "nothing claims the configuration is fine");
    }
    // Checked against the catalog that will be uploaded, a plan it declares passes.
    let catalog = file(
        &dir,
        "catalog.xml",
        &std::fs::read_to_string(crate::support::root().join("deploy/killbill/catalog.xml"))
            .unwrap()
            .replace("openstack-volume-premium-monthly", "openstack-disk-monthly"),
    );
    let config = file(&dir, "disk.toml", traps[3].0);
    let out = run_cli(&["--config", arg(&config), "config", "check", "--catalog", arg(&catalog)]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

// Two workers: the fake Keystone answers while the test waits for the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_fails_when_keystone_says_the_managed_scope_admits_no_project() {
    let keystone = crate::support::keystone::FakeKeystone::start().await;
    let user = keystone.add_user("concertim");
    let role = keystone.add_role("watcher");
    let project = keystone.add_project("CM_physics");
    let k = keystone.settings();
    let dir = tempfile::tempdir().unwrap();
    let config = |names: &str| {
        format!(
            "[projects]\nmanaged_by = {{ user = \"{user}\", role = \"{role}\" }}\ninclude_names = [{names}]\n\n[keystone]\nurl = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nproject = \"{}\"\n",
            k.url,
            k.username.as_deref().unwrap(),
            k.password.as_ref().unwrap().expose(),
            k.project.as_deref().unwrap()
        )
    };
    let check = |text: String| {
        let path = file(&dir, "scope.toml", &text);
        let out = run_cli(&["--config", arg(&path), "config", "check"]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, stderr) = check(config("\"CM_nothing*\""));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("no project is in the managed scope"), "{stderr}");
    keystone.assign(&user, &role, &project);
    let (code, stdout, stderr) = check(config(""));
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("# managed scope: 1 project(s) admitted now"), "{stdout}");
    assert!(!stdout.contains(k.password.as_ref().unwrap().expose()), "the Keystone password is never shown");
}
