"""Benchmark internals: tile streaming, the engine alone and end to end, the roofline. Imported by
`hexfast bench` and benchmarks/ only; nothing in the runtime imports them."""
