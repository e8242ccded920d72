"""MQTT: the one paho client factory, the result publisher, the spool, payloads and their schemas,
and command dispatch (topic -> handler)."""
