"""Validates sensorgate's MQTT discovery messages with Home Assistant's own code: the device
discovery schema, then each component, merged with the device's shared options as Home
Assistant does it, against its platform's DISCOVERY_SCHEMA (tests/homeassistant.rs runs it).

  validate.py < discovery.jsonl     one {"topic": ..., "payload": {...}} per line

Prints one line per component, and exits 1 if anything is refused.
"""
import asyncio
import copy
import json
import sys
import tempfile

from homeassistant.components.mqtt import discovery as d
from homeassistant.components.mqtt.const import CONF_COMPONENTS
from homeassistant.const import CONF_PLATFORM
from homeassistant.components.mqtt.schemas import DEVICE_DISCOVERY_SCHEMA
import homeassistant.components.mqtt.binary_sensor as binary_sensor
import homeassistant.components.mqtt.sensor as sensor

PLATFORMS = {"sensor": sensor.DISCOVERY_SCHEMA, "binary_sensor": binary_sensor.DISCOVERY_SCHEMA}

def validate(lines):
    """Templates are validated (compiled) by Home Assistant's own code, which needs a running
    HomeAssistant and its event loop."""
    refused = 0
    for line in lines:
        msg = json.loads(line)
        payload = copy.deepcopy(msg["payload"])
        d._replace_all_abbreviations(payload)
        try:
            device = DEVICE_DISCOVERY_SCHEMA(copy.deepcopy(payload))
            d.validate_device_discovery_components(device)
        except Exception as e:  # noqa: BLE001
            print(f"REFUSED device {msg['topic']}: {e}")
            refused += 1
            continue
        for cid, comp in payload[CONF_COMPONENTS].items():
            comp = dict(comp)
            platform = comp.pop(CONF_PLATFORM)
            config = d.MQTTDiscoveryPayload(comp)
            if config:
                config["device"] = payload["device"]
                if "origin" in payload:
                    config["origin"] = payload["origin"]
                d._merge_common_device_options(config, payload)
            try:
                PLATFORMS[platform](dict(config))
                print(f"ok {platform} {cid} ({msg['topic']})")
            except Exception as e:  # noqa: BLE001
                print(f"REFUSED {platform} {cid} ({msg['topic']}): {e}")
                refused += 1
    return refused


async def main():
    from homeassistant.core import HomeAssistant

    with tempfile.TemporaryDirectory() as config_dir:
        hass = HomeAssistant(config_dir)
        try:
            return validate(sys.stdin.readlines())
        finally:
            await hass.async_stop(force=True)


sys.exit(1 if asyncio.run(main()) else 0)
