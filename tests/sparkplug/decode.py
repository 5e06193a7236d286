"""Decodes what the gateway published on spBv1.0/# with pysparkplug (an implementation we did
not write), for tests/sparkplug.rs.

  decode.py decode   stdin: one JSON object per line, {"topic": ..., "hex": payload in hex}
                     stdout: one JSON object per message, as pysparkplug decoded it
  decode.py ncmd-rebirth
                     stdout: the hex of an NCMD payload asking for a rebirth
  decode.py dcmd NAME TYPE VALUE
                     stdout: the hex of a DCMD payload setting metric NAME (TYPE: a
                     pysparkplug DataType name, e.g. DOUBLE, BOOLEAN) to VALUE (JSON)

Data messages are decoded with the last birth of their node or device, as a host does: names
and datatypes come from the birth through the aliases.
"""
import json
import sys

import pysparkplug as spb


def metric(m):
    value = m.value
    if isinstance(value, bytes):
        value = value.hex()
    return {
        "name": m.name,
        "alias": m.alias,
        "datatype": m.datatype.name,
        "value": value,
        "is_null": m.is_null,
        "is_historical": m.is_historical,
    }


def decode():
    births = {}
    kinds = {
        "NBIRTH": spb.NBirth, "DBIRTH": spb.DBirth, "NDATA": spb.NData, "DDATA": spb.DData,
        "NCMD": spb.NCmd, "DCMD": spb.DCmd,
    }
    for line in sys.stdin:
        msg = json.loads(line)
        topic, raw = msg["topic"], bytes.fromhex(msg["hex"])
        parts = topic.split("/")
        out = {"topic": topic}
        if parts[1] == "STATE":
            state = spb.State.decode(raw)
            out.update(type="STATE", online=state.online)
        else:
            kind = parts[2]
            key = "/".join(parts[1:2] + parts[3:])
            out["type"] = kind
            if kind == "NDEATH":
                p = spb.NDeath.decode(raw)
                out["bdSeq"] = p.bd_seq_metric.value
                out["metrics"] = [metric(p.bd_seq_metric)]
            elif kind == "DDEATH":
                p = spb.DDeath.decode(raw)
                out.update(seq=p.seq, timestamp=p.timestamp)
            else:
                birth_key = key if kind in ("NBIRTH", "DBIRTH", "NDATA", "DDATA") else None
                birth = births.get(birth_key) if kind in ("NDATA", "DDATA") else None
                if kind in ("NDATA", "DDATA") and birth is None:
                    out["error"] = "data before its birth"
                p = kinds[kind].decode(raw, birth=birth)
                if kind in ("NBIRTH", "DBIRTH"):
                    births[birth_key] = p
                out.update(seq=getattr(p, "seq", None), timestamp=p.timestamp,
                           metrics=[metric(m) for m in p.metrics])
                if kind == "NBIRTH":
                    out["bdSeq"] = next(m.value for m in p.metrics if m.name == "bdSeq")
        print(json.dumps(out), flush=True)


def ncmd_rebirth():
    m = spb.Metric(timestamp=spb.get_current_timestamp(), name="Node Control/Rebirth",
                   datatype=spb.DataType.BOOLEAN, value=True)
    print(spb.NCmd(timestamp=spb.get_current_timestamp(), metrics=(m,)).encode(include_dtypes=True).hex())


def dcmd():
    name, dtype, value = sys.argv[2], spb.DataType[sys.argv[3]], json.loads(sys.argv[4])
    m = spb.Metric(timestamp=spb.get_current_timestamp(), name=name, datatype=dtype, value=value)
    print(spb.DCmd(timestamp=spb.get_current_timestamp(), metrics=(m,)).encode(include_dtypes=True).hex())


if __name__ == "__main__":
    {"decode": decode, "ncmd-rebirth": ncmd_rebirth, "dcmd": dcmd}[sys.argv[1]]()
