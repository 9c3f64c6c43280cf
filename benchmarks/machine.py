"""The machine a benchmark ran on, printed with every figure (benchmarks are run as scripts:
`python benchmarks/NAME.py`, so this folder is on sys.path)."""


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown CPU" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"
