//! Deployment artefacts: `deploy/rabbitmq/definitions.json` describes what `topology declare`
//! creates (never OpenStack's own exchanges: the service only binds to them once they exist).

use concertim_billing::{
    bus::{self, topology},
    config::{SecretUrl, Settings},
};

use crate::support::{rabbitmqctl, root};

#[tokio::test]
async fn definitions_json_loaded_into_a_fresh_vhost_is_the_topology_the_service_declares() {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let vhost = format!("concertim-defs-{}-{nanos}", std::process::id());
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let definitions = std::fs::read_to_string(root().join("deploy/rabbitmq/definitions.json")).unwrap();
    let definitions = definitions
        .replace("\"vhost\": \"/\"", &format!("\"vhost\": \"{vhost}\""))
        .replace("\"vhosts\": [{\"name\": \"/\"}]", &format!("\"vhosts\": [{{\"name\": \"{vhost}\"}}]"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("definitions.json");
    std::fs::write(&file, definitions).unwrap();
    // rabbitmqctl runs as the broker's user, which may not read our temporary directory.
    let shared = std::env::temp_dir().join(format!("{vhost}.json"));
    std::fs::copy(&file, &shared).unwrap();
    rabbitmqctl(&["import_definitions", shared.to_str().unwrap()]);
    let _ = std::fs::remove_file(&shared);

    // The service's own declaration finds everything with the same arguments (a difference would
    // be PRECONDITION_FAILED) and adds nothing.
    let queues_before = rabbitmqctl(&["list_queues", "-p", &vhost, "-q", "name", "arguments"]);
    let bindings_before = rabbitmqctl(&["list_bindings", "-p", &vhost, "-q"]);
    let mut settings = Settings::embedded();
    settings.bus.url = SecretUrl::new(format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"));
    let connection = bus::connect(&settings.bus, "definitions test").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    topology::declare(&channel, &settings.bus).await.unwrap();
    // Without OpenStack's exchanges nothing is bound: the service never creates them.
    assert_eq!(topology::bind_upstream(&settings.bus).await.unwrap(), settings.bus.bindings);
    // OpenStack's publishers declare them (here as oslo does by default: not durable).
    for binding in &settings.bus.bindings {
        channel
            .exchange_declare(
                binding.exchange.as_str().into(),
                lapin::ExchangeKind::Topic,
                lapin::options::ExchangeDeclareOptions::default(),
                Default::default(),
            )
            .await
            .unwrap();
    }
    assert_eq!(topology::bind_upstream(&settings.bus).await.unwrap(), Vec::new());
    let _ = connection.close(200, "done".into()).await;
    let sorted = |text: String| {
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines.sort();
        lines
    };
    assert_eq!(sorted(rabbitmqctl(&["list_queues", "-p", &vhost, "-q", "name", "arguments"])), sorted(queues_before));
    // Only the upstream bindings are added, once OpenStack's exchanges exist.
    let added: Vec<String> = sorted(rabbitmqctl(&["list_bindings", "-p", &vhost, "-q"]))
        .into_iter()
        .filter(|line| !bindings_before.lines().any(|b| b == line))
        .collect();
    let upstream: Vec<&str> = settings.bus.bindings.iter().map(|b| b.exchange.as_str()).collect();
    assert_eq!(added.len(), upstream.len(), "{added:?}");
    assert!(added.iter().all(|line| upstream.iter().any(|e| line.starts_with(&format!("{e}\t")))), "{added:?}");
    assert_eq!(rabbitmqctl(&["list_queues", "-p", &vhost, "-q", "--no-table-headers", "name"]).lines().count(), 3);
    rabbitmqctl(&["delete_vhost", &vhost]);
}
