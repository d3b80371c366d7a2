#!/usr/bin/env python3
"""Loss curves of `moetune train` runs, compared and plotted, for train_smoke.sh and
loss_curves.sh. A run is a folder OUT/NAME holding metrics.jsonl; its curve is the training
loss per step (eval rows skipped; a step logged twice, as after --resume, keeps its last row).

  curves.py check OUT STEPS CHECK...   every run named in a CHECK must have logged STEPS
                                       steps; exits 1 when one is off
      CHECK = NAME,AGAINST,WHAT,BOUND: the max relative difference of NAME's curve to
      AGAINST's (|a - b| / |b| per step) must be <= BOUND, over WHAT:
        mean        the 20-step running means, at every step
        steps:A-B   the raw losses of steps A to B (1-based, inclusive; B may be left out)
  curves.py plot OUT STEPS TITLE NAME...   writes OUT/loss_curves.csv and OUT/loss_curves.svg
                                           (raw losses faint, 20-step means solid)
"""
import json
import sys

WINDOW = 20


def curve(out, name):
    """The training loss at each logged step of run `name`, in step order."""
    losses = {}
    with open(f"{out}/{name}/metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if not row.get("eval") and "loss" in row:
                losses[row["step"]] = row["loss"]
    return [losses[s] for s in sorted(losses)]


def smooth(values, window=WINDOW):
    """The running mean of the last `window` values (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def max_rel(a, b):
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))


def compare(curves, name, against, what, bound):
    """Prints one check's line; returns whether it holds."""
    a, b = curves[name], curves[against]
    if what == "mean":
        values_a, values_b, label = smooth(a), smooth(b), f"{WINDOW}-step means"
    elif what.startswith("steps:"):
        first, _, last = what[len("steps:"):].partition("-")
        first, last = int(first), int(last) if last else len(b)
        values_a, values_b, label = a[first - 1:last], b[first - 1:last], f"steps {first}-{last}"
    else:
        raise SystemExit(f"curves.py: unknown comparison '{what}' (mean or steps:A-B)")
    diff = max_rel(values_a, values_b)
    good = diff <= bound and len(values_a) == len(values_b) > 0
    print(f"{name:20s} vs {against:10s} loss first {a[0]:.4f} final {a[-1]:.4f} / {b[-1]:.4f}  "
          f"max rel diff ({label}) {diff:.4f}  bound {bound}  {'ok' if good else 'OFF'}")
    return good


def check(out, steps, specs):
    parsed = []
    for spec in specs:
        parts = spec.split(",")
        if len(parts) != 4:
            raise SystemExit(f"curves.py: check '{spec}' is not NAME,AGAINST,WHAT,BOUND")
        parsed.append((parts[0], parts[1], parts[2], float(parts[3])))
    names = dict.fromkeys(n for name, against, _, _ in parsed for n in (name, against))
    curves = {name: curve(out, name) for name in names}
    ok = True
    for name, values in curves.items():
        if len(values) != steps:
            print(f"{name} logged {len(values)} of {steps} steps  OFF")
            ok = False
    if not ok:
        return False
    for name, against, what, bound in parsed:
        ok &= compare(curves, name, against, what, bound)
    return ok


def plot(out, steps, title, names):
    curves = {name: curve(out, name) for name in names}
    for name, values in curves.items():
        if len(values) != steps:
            raise SystemExit(f"curves.py: {name} logged {len(values)} of {steps} steps")
    with open(f"{out}/loss_curves.csv", "w") as f:
        f.write("step," + ",".join(names) + "\n")
        for i in range(steps):
            f.write(f"{i + 1}," + ",".join(f"{curves[n][i]:.5f}" for n in names) + "\n")

    W, H, L, R, T, B = 760, 420, 60, 150, 30, 45
    lo = min(min(v) for v in curves.values())
    hi = max(max(v) for v in curves.values())
    lo, hi = max(0.0, lo - 0.2), hi + 0.2
    x = lambda i: L + (W - L - R) * i / (steps - 1)
    y = lambda v: T + (H - T - B) * (hi - v) / (hi - lo)
    colours = ["#222222", "#d62728", "#1f77b4", "#2ca02c"]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{L}" y="18">{title} ({steps} steps; solid: {WINDOW}-step mean)</text>']
    for k in range(6):
        v = lo + (hi - lo) * k / 5
        svg.append(f'<line x1="{L}" x2="{W - R}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        svg.append(f'<text x="{L - 8}" y="{y(v) + 4:.1f}" text-anchor="end">{v:.1f}</text>')
    for k in range(5):
        s = round(1 + (steps - 1) * k / 4)
        svg.append(f'<text x="{x(s - 1):.1f}" y="{H - B + 18}" text-anchor="middle">{s}</text>')
    svg.append(f'<text x="{(L + W - R) / 2}" y="{H - 8}" text-anchor="middle">step</text>')
    for c, name in zip(colours, names):
        raw = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(curves[name]))
        mean = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(smooth(curves[name])))
        svg.append(f'<polyline points="{raw}" fill="none" stroke="{c}" stroke-opacity="0.25"/>')
        svg.append(f'<polyline points="{mean}" fill="none" stroke="{c}" stroke-width="1.8"/>')
    for k, (c, name) in enumerate(zip(colours, names)):
        svg.append(f'<line x1="{W - R + 12}" x2="{W - R + 34}" y1="{T + 10 + 18 * k}" y2="{T + 10 + 18 * k}" stroke="{c}" stroke-width="2"/>')
        svg.append(f'<text x="{W - R + 40}" y="{T + 14 + 18 * k}">{name}</text>')
    svg.append("</svg>")
    with open(f"{out}/loss_curves.svg", "w") as f:
        f.write("\n".join(svg) + "\n")
    print(f"wrote {out}/loss_curves.csv and {out}/loss_curves.svg")


def main(argv):
    if len(argv) < 4 or argv[1] not in ("check", "plot"):
        raise SystemExit(__doc__)
    command, out, steps = argv[1], argv[2], int(argv[3])
    if command == "check":
        return 0 if check(out, steps, argv[4:]) else 1
    if len(argv) < 6:
        raise SystemExit(__doc__)
    plot(out, steps, argv[4], argv[5:])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
