"""Modbus RTU slaves served by pymodbus (tests/modbus_pymodbus.rs): a serial server on the
port given as the first argument, answering for units 1 to 5, 8N1 (a pseudo-terminal carries
no parity bits; the gateway's side is opened 8E1).

The register values are packed here with Python's struct, independently of the gateway's
decoder, so a word order or sign mistake on either side shows up in the test.

Unit 1, "every type" (the same registers in the holding and in the input table):
  0 u16 48879 (0xBEEF)          1 i16 -1234
  2 u32 0x12345678 big          4 u32 0x12345678 little (least significant word first)
  6 i32 -123456 big             8 i32 -123456 little
  10 u64 0x0123456789ABCDEF big 14 the same, little
  18 i64 -2 big                 22 i64 -2 little
  26 f32 -1234.5 big            28 f32 -1234.5 little
  30 f64 -98765.4321 big        34 f64 -98765.4321 little
  38 u16 655 (a scaled point)   39 i16 215 (holding only: the writable setpoint)
  coils 0-3: 1 0 1 1, coil 8 (the writable relay) 0; discrete inputs 0-1: 0 1.
Units 2 to 5, meters: holding 0 = unit × 100 (u16), input 0-1 = unit × 100000 + 1 (u32, big).
Any other address answers exception 02 (illegal data address).

Prints "ready" on stdout once the port is open.
"""

import asyncio
import logging
import struct
import sys

from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer
from pymodbus.simulator import DataType, SimData, SimDevice


def words(fmt, value, little=False):
    """The 16-bit registers of `value` packed big-endian; `little` reverses the word order."""
    raw = struct.pack(">" + fmt, value)
    w = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    return w[::-1] if little else w


def every_type():
    regs = words("H", 0xBEEF) + words("h", -1234)
    for fmt, value in [
        ("I", 0x12345678),
        ("i", -123456),
        ("Q", 0x0123456789ABCDEF),
        ("q", -2),
        ("f", -1234.5),
        ("d", -98765.4321),
    ]:
        regs += words(fmt, value) + words(fmt, value, little=True)
    regs += words("H", 655) + words("h", 215)
    assert len(regs) == 40, len(regs)
    coils = [True, False, True, True, False, False, False, False, False]
    discretes = [False, True]
    return SimDevice(
        id=1,
        simdata=(
            [SimData(0, values=coils, datatype=DataType.BITS)],
            [SimData(0, values=discretes, datatype=DataType.BITS)],
            [SimData(0, values=regs, datatype=DataType.REGISTERS)],
            [SimData(0, values=regs[:39], datatype=DataType.REGISTERS)],
        ),
    )


def meter(unit):
    return SimDevice(
        id=unit,
        simdata=(
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[False], datatype=DataType.BITS)],
            [SimData(0, values=[unit * 100], datatype=DataType.REGISTERS)],
            [SimData(0, values=words("I", unit * 100000 + 1), datatype=DataType.REGISTERS)],
        ),
    )


async def main(port):
    logging.basicConfig(level=logging.ERROR)

    def connected(up):
        if up:
            print("ready", flush=True)

    server = ModbusSerialServer(
        [every_type()] + [meter(u) for u in range(2, 6)],
        framer=FramerType.RTU,
        port=port,
        baudrate=115200,
        bytesize=8,
        parity="N",
        stopbits=1,
        trace_connect=connected,
    )
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
