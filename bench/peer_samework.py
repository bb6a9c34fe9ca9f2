"""The same-work ceiling of the peers stage: a plain confluent-kafka (librdkafka) loop
doing the pipeline passthrough's work, with nothing else in the way.

    consume a batch → `encode(registry.decode(value))` each → produce (same key, same
    partition) → poll delivery reports; flush at the end

One consumer reads the input from the beginning (fresh group, no offset commits), one
producer with librdkafka's defaults (acks=all, linger 5 ms) writes the output. After the
last record is flushed it waits to be stopped, so that the harness, which times it by the
output topic's end offsets like the pipeline, sees it alive until it has seen all N.

Run as ``python -m bench.peer_samework`` with the python of the peers' virtualenv
(`bench.peers_venv`) under the environment described in `bench.peers_common`.
"""

from __future__ import annotations

import signal
import sys
import time

from bench.peers_common import peer_env, work

#: records per `consume` call (the pipeline's fetches are of the same order)
BATCH = 10_000


def main() -> None:
    from confluent_kafka import Consumer, KafkaException, Producer

    bootstrap, group, source, sink, events = peer_env()
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    producer = Producer({"bootstrap.servers": bootstrap})
    failed: list[str] = []

    def delivered(err: object, _msg: object) -> None:
        if err is not None:
            failed.append(str(err))

    consumer.subscribe([source])
    seen = 0
    t_first: float | None = None
    produce, poll = producer.produce, producer.poll
    while seen < events:
        for msg in consumer.consume(BATCH, timeout=1.0):
            if msg.error():
                raise KafkaException(msg.error())
            if t_first is None:
                t_first = time.monotonic()
            value = work(msg.value())
            while True:
                try:
                    produce(
                        sink,
                        value,
                        key=msg.key(),
                        partition=msg.partition(),
                        on_delivery=delivered,
                    )
                    break
                except BufferError:  # the local queue is full: let deliveries drain
                    poll(0.05)
            seen += 1
        poll(0)
    left = producer.flush(60)
    if left or failed:
        sys.exit(f"samework: {left} undelivered, {len(failed)} failed: {failed[:3]}")
    assert t_first is not None
    span = time.monotonic() - t_first
    print(f"samework: {seen} events, {seen / span:,.0f} ev/s by its own clock", flush=True)
    consumer.close()
    while True:  # SIGTERM from the harness ends the process
        signal.pause()


if __name__ == "__main__":
    main()
