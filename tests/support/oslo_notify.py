#!/usr/bin/env python3
"""Publishes notifications the way OpenStack's services do: with oslo.messaging's own Notifier
over its RabbitMQ driver, configured as Nova configures it (control_exchange, the
`notifications` topic, [oslo_messaging_rabbit] amqp_durable_queues / rabbit_quorum_queue / amqp_auto_delete).

Reads one notification per line on stdin, {"event_type", "priority", "payload", "publisher_id"},
and sends each with the Notifier; exits non-zero when the driver fails to publish (it logs and
drops a notification it cannot send, so a failure is also looked for in its log records).

    oslo_notify.py --url rabbit://guest:guest@127.0.0.1:5672/ --exchange nova [--durable] [--quorum]
"""

import argparse
import json
import logging
import sys

from oslo_config import cfg
import oslo_messaging


class Failures(logging.Handler):
    """Counts the driver's error records: oslo.messaging logs and drops what it cannot send."""

    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(self.format(record))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True, help="control_exchange, e.g. nova")
    parser.add_argument("--durable", action="store_true", help="amqp_durable_queues = True")
    parser.add_argument("--quorum", action="store_true", help="rabbit_quorum_queue = True")
    parser.add_argument("--auto-delete", action="store_true", help="amqp_auto_delete = True")
    args = parser.parse_args()

    failures = Failures()
    logging.getLogger().addHandler(failures)
    logging.getLogger().setLevel(logging.WARNING)

    conf = cfg.ConfigOpts()
    conf([], project="concertim-billing-tests")
    oslo_messaging.set_transport_defaults(control_exchange=args.exchange)
    transport = oslo_messaging.get_notification_transport(conf, url=args.url)
    if args.durable:
        conf.set_override("amqp_durable_queues", True, group="oslo_messaging_rabbit")
    if args.quorum:
        conf.set_override("rabbit_quorum_queue", True, group="oslo_messaging_rabbit")
    if args.auto_delete:
        conf.set_override("amqp_auto_delete", True, group="oslo_messaging_rabbit")
    sent = 0
    for line in sys.stdin:
        if not line.strip():
            continue
        n = json.loads(line)
        notifier = oslo_messaging.Notifier(
            transport, publisher_id=n["publisher_id"], driver="messaging", topics=["notifications"]
        )
        send = getattr(notifier, n["priority"].lower())
        send({}, n["event_type"], n["payload"])
        sent += 1
    transport.cleanup()
    if failures.records:
        print("\n".join(failures.records), file=sys.stderr)
        return 1
    print(f"sent {sent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
