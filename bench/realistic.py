"""A realistic workload for the strategy comparison: SQLite answering
queries against a database that lives in the restored guest's memory.

The page accesses come from real code (libsqlite3's b-tree and pager, in a
child process: bench/sqlguest.py) working in place on real data, not from a
generated trace. The memory image is `size` bytes of sample memory
(restore.sample: zero, text-like and random pages) with an SQLite database
(customers, products, orders, order lines; text and numbers; indexes) copied
in at a page-aligned offset that is not chunk aligned; `<image>.json`
beside it records where.

Two request mixes draw their parameters from overlapping distributions: a
hot subset (a few hundred regular customers, the newest orders, the last
month) shared by both, and cold keys (anyone, anything, any time) that
differ. Mix A is recorded (its fault log becomes the plan); mix B is
measured, so B finds most but not all of its working set in the plan.

    realistic_rows(work, rounds, size_mib, caches=("warm", "cold")) -> [Row, ...]

runs, interleaved, per round and cache state: resident, mmap, uffd-lazy,
uffd-replay (with a host cache filled before the rounds), uffd-replay-l1
(no host cache: chunks decoded from L1) and uffd-replay-hc-empty (a new,
empty host cache), each one guest process answering mix B; every answer of
every run is checked against the resident run's (which is itself checked
against Python's sqlite3 module on the database file).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from bench import pagecache
from bench.results import Row
from bench.sqlguest import GuestFailure, run_guest
from restore.handler import Server
from restore.settings import ServerSettings
from restore.sample import write_sample_image
from restore.snapshot import Snapshot, create_snapshot
from restore.tiers.durable import DurableStore
from restore.tiers.host import HostCache
from restore.tiers.l1 import L1Cache
from restore.workingset import rebuild_plan

P = 4096
STRATEGIES = ["resident", "mmap", "uffd-lazy", "uffd-replay", "uffd-replay-l1",
              "uffd-replay-hc-empty"]  # names from bench.results.STRATEGIES

# -- the database ------------------------------------------------------------------

_FIRST = ("james mary john patricia robert jennifer michael linda william elizabeth david barbara richard susan "
          "joseph jessica thomas sarah charles karen amir sofia wei yuki olga pierre ana lars fatima ivan "
          "mei carlos nina omar lea hugo ines").split()
_LAST = ("smith johnson williams brown jones garcia miller davis rodriguez martinez hernandez lopez gonzalez "
         "wilson anderson thomas taylor moore jackson martin lee perez thompson white harris sanchez clark "
         "ramirez lewis robinson walker young allen king wright scott torres nguyen hill flores").split()
_CITIES = [("US", "New York"), ("US", "Chicago"), ("US", "Austin"), ("US", "Seattle"), ("US", "Denver"),
           ("GB", "London"), ("GB", "Leeds"), ("DE", "Berlin"), ("DE", "Munich"), ("FR", "Paris"),
           ("FR", "Lyon"), ("ES", "Madrid"), ("IT", "Milan"), ("NL", "Amsterdam"), ("SE", "Stockholm"),
           ("PL", "Warsaw"), ("JP", "Osaka"), ("JP", "Tokyo"), ("BR", "Sao Paulo"), ("IN", "Pune"),
           ("CA", "Toronto"), ("AU", "Sydney")]
_DOMAINS = ["example.com", "mail.example.org", "post.example.net", "inbox.example.io"]
_STREETS = "Main Oak Pine Maple Cedar Elm Lake Hill Park Mill River Church Station High Market".split()
_CATEGORIES = ["books", "garden", "kitchen", "toys", "electronics", "outdoor", "office", "music", "beauty",
               "sports", "tools", "grocery"]
_ADJ = "small large classic deluxe compact portable quiet smart organic steel bamboo wireless heavy light".split()
_NOUN = ("lamp kettle chair notebook speaker blender drill racket guitar shampoo jacket tent pan mug charger "
         "backpack cable monitor planter puzzle").split()
_WORDS = ("durable easy to clean designed for everyday use with a long warranty made from recycled materials "
          "fits most standard sizes comes with a carrying case and a quick start guide suitable for beginners "
          "and professionals alike available in several colours lightweight and sturdy").split()
_STATUS = ["delivered", "shipped", "pending", "cancelled", "returned"]
_T0 = np.datetime64("2022-01-01T00:00:00")
_DAYS = 730  # orders span two years


@dataclass(frozen=True)
class ImageInfo:
    """Where the database is in the image, and what is in it (the JSON beside the image)."""

    image: Path
    size: int  # bytes of memory
    db_offset: int  # bytes into the image, page aligned
    db_length: int  # bytes
    customers: int
    products: int
    orders: int
    days: int  # orders are spread over this many days from 2022-01-01

    @classmethod
    def load(cls, image: str | os.PathLike) -> "ImageInfo":
        d = json.loads(Path(f"{image}.json").read_text())
        return cls(image=Path(image), **{k: v for k, v in d.items() if k != "image"})

    def save(self) -> None:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        Path(f"{self.image}.json").write_text(json.dumps(d, indent=1) + "\n")


def _ts(seconds: np.ndarray) -> list[str]:
    """'YYYY-MM-DD HH:MM:SS' strings, seconds after 2022-01-01."""
    return np.char.replace(np.datetime_as_string(_T0 + seconds.astype("timedelta64[s]"), unit="s"), "T", " ").tolist()


def build_database(path: str | os.PathLike, orders: int, seed: int = 5) -> dict:
    """Write an SQLite database of `orders` orders (and customers, products,
    order lines in proportion) to path with Python's sqlite3; 4 KiB pages,
    rollback journal (not WAL). Returns the row counts."""
    rng = np.random.default_rng(seed)
    n_cust = max(50, orders // 8)
    n_prod = max(40, orders // 40)
    path = Path(path)
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript("""
        PRAGMA page_size = 4096;
        PRAGMA journal_mode = OFF;
        PRAGMA synchronous = OFF;
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL,
            country TEXT NOT NULL, city TEXT NOT NULL, created_at TEXT NOT NULL, tier INTEGER NOT NULL);
        CREATE TABLE products (id INTEGER PRIMARY KEY, sku TEXT NOT NULL, name TEXT NOT NULL,
            category TEXT NOT NULL, price_cents INTEGER NOT NULL, description TEXT NOT NULL);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers,
            ordered_at TEXT NOT NULL, status TEXT NOT NULL, total_cents INTEGER NOT NULL,
            shipping_address TEXT NOT NULL);
        CREATE TABLE order_items (order_id INTEGER NOT NULL REFERENCES orders, line INTEGER NOT NULL,
            product_id INTEGER NOT NULL REFERENCES products, quantity INTEGER NOT NULL,
            unit_price_cents INTEGER NOT NULL, PRIMARY KEY (order_id, line));
    """)
    # customers
    first = rng.choice(_FIRST, n_cust)
    last = rng.choice(_LAST, n_cust)
    city = rng.integers(0, len(_CITIES), n_cust)
    dom = rng.integers(0, len(_DOMAINS), n_cust)
    created = _ts(rng.integers(0, 86400 * _DAYS, n_cust))
    tier = rng.choice(4, n_cust, p=[0.6, 0.25, 0.1, 0.05])
    con.executemany("INSERT INTO customers VALUES (?,?,?,?,?,?,?)", (
        (i + 1, f"{first[i].title()} {last[i].title()}", f"{first[i]}.{last[i]}{i + 1}@{_DOMAINS[dom[i]]}",
         _CITIES[city[i]][0], _CITIES[city[i]][1], created[i], int(tier[i])) for i in range(n_cust)))
    # products
    cat = rng.integers(0, len(_CATEGORIES), n_prod)
    price = np.round(rng.lognormal(7.5, 1.0, n_prod)).astype(np.int64) + 99
    adj, noun = rng.choice(_ADJ, n_prod), rng.choice(_NOUN, n_prod)
    desc_len = rng.integers(12, 45, n_prod)
    con.executemany("INSERT INTO products VALUES (?,?,?,?,?,?)", (
        (i + 1, f"{_CATEGORIES[cat[i]][:3].upper()}-{i + 1:06d}", f"{adj[i].title()} {noun[i]}", _CATEGORIES[cat[i]],
         int(price[i]), " ".join(rng.choice(_WORDS, desc_len[i])).capitalize() + ".") for i in range(n_prod)))
    # orders, in time order (ids grow with time), more of them lately
    secs = np.sort((86400 * _DAYS * np.sqrt(rng.random(orders))).astype(np.int64))
    when = _ts(secs)
    # A customer's orders: a few regulars order much more than the rest.
    cust = (np.minimum(rng.zipf(1.3, orders), 10**9) * 7919 + rng.integers(0, n_cust, orders)) % n_cust + 1
    lines = rng.integers(1, 6, orders)
    age_days = _DAYS - secs / 86400
    status = np.where(age_days < 3, rng.choice([1, 2], orders), rng.choice([0, 0, 0, 0, 0, 0, 0, 0, 3, 4], orders))
    house = rng.integers(1, 400, orders)
    street = rng.integers(0, len(_STREETS), orders)
    zipc = rng.integers(10000, 99999, orders)
    prod = rng.integers(1, n_prod + 1, int(lines.sum()))
    qty = rng.choice([1, 1, 1, 2, 2, 3, 5], len(prod))
    item_rows, totals, k = [], np.zeros(orders, dtype=np.int64), 0
    for o in range(orders):
        for ln in range(lines[o]):
            p = int(prod[k])
            item_rows.append((o + 1, ln + 1, p, int(qty[k]), int(price[p - 1])))
            totals[o] += int(qty[k]) * int(price[p - 1])
            k += 1
    ccity = city[cust - 1]
    con.executemany("INSERT INTO orders VALUES (?,?,?,?,?,?)", (
        (o + 1, int(cust[o]), when[o], _STATUS[status[o]], int(totals[o]),
         f"{house[o]} {_STREETS[street[o]]} St, {_CITIES[ccity[o]][1]} {zipc[o]}, {_CITIES[ccity[o]][0]}")
        for o in range(orders)))
    con.executemany("INSERT INTO order_items VALUES (?,?,?,?,?)", item_rows)
    con.executescript("""
        CREATE UNIQUE INDEX customers_email ON customers(email);
        CREATE INDEX customers_country_city ON customers(country, city);
        CREATE UNIQUE INDEX products_sku ON products(sku);
        CREATE INDEX products_category_price ON products(category, price_cents);
        CREATE INDEX orders_customer ON orders(customer_id, ordered_at);
        CREATE INDEX orders_time ON orders(ordered_at);
        CREATE INDEX order_items_product ON order_items(product_id);
        ANALYZE;
    """)
    con.commit()
    con.execute("VACUUM")
    con.execute("PRAGMA journal_mode = DELETE")
    con.close()
    return {"customers": n_cust, "products": n_prod, "orders": orders}


# Bytes of database per order (all four tables and their indexes), measured.
_BYTES_PER_ORDER = 285


def build_image(image: str | os.PathLike, size: int, db_mib: Optional[float] = None, seed: int = 5) -> ImageInfo:
    """A `size`-byte memory image holding an SQLite database of about db_mib
    MiB (default: an eighth of memory) at a page-aligned offset; the rest
    sample memory. Writes `<image>.json` and keeps the database file as
    `<image>.db`. Returns its ImageInfo."""
    image = Path(image)
    if size % P:
        raise ValueError(f"image size {size} is not a multiple of {P}")
    db_bytes = (db_mib * 2**20) if db_mib is not None else size / 8
    db_path = Path(f"{image}.db")
    counts = build_database(db_path, max(400, int(db_bytes / _BYTES_PER_ORDER)), seed=seed)
    db = db_path.read_bytes()
    # Not chunk aligned, as a process's heap would not be: 3/10 in, plus 5 pages.
    offset = (size * 3 // 10) // P * P + 5 * P
    if offset + len(db) > size:
        offset = (size - len(db)) // P * P
        if offset < 0:
            raise ValueError(f"a {len(db)}-byte database does not fit in {size} bytes of memory")
    write_sample_image(image, size, seed=seed, zero=0.4, random=0.1)
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(db)
    info = ImageInfo(image=image, size=size, db_offset=offset, db_length=len(db), days=_DAYS, **counts)
    info.save()
    return info


# -- the request mixes ---------------------------------------------------------------------

Q_EMAIL = "SELECT id, name, city, tier FROM customers WHERE email = ?"
Q_RECENT = ("SELECT id, ordered_at, status, total_cents FROM orders WHERE customer_id = ? "
            "ORDER BY ordered_at DESC LIMIT 10")
Q_ORDER = ("SELECT o.id, o.ordered_at, o.status, c.name, p.sku, p.name, i.quantity, i.unit_price_cents "
           "FROM orders o JOIN customers c ON c.id = o.customer_id JOIN order_items i ON i.order_id = o.id "
           "JOIN products p ON p.id = i.product_id WHERE o.id = ? ORDER BY i.line")
Q_WINDOW = ("SELECT id, customer_id, status, total_cents FROM orders WHERE ordered_at >= ? AND ordered_at < ? "
            "ORDER BY ordered_at LIMIT 50")
Q_DAILY = ("SELECT status, COUNT(*), SUM(total_cents), ROUND(AVG(total_cents), 2) FROM orders "
           "WHERE ordered_at >= ? AND ordered_at < ? GROUP BY status ORDER BY status")
Q_TOP = ("SELECT p.id, p.name, SUM(i.quantity) AS q, SUM(i.quantity * i.unit_price_cents) FROM order_items i "
         "JOIN products p ON p.id = i.product_id WHERE i.order_id BETWEEN ? AND ? AND p.category = ? "
         "GROUP BY p.id ORDER BY q DESC, p.id LIMIT 5")
Q_PRICE = ("SELECT sku, name, price_cents FROM products WHERE category = ? AND price_cents BETWEEN ? AND ? "
           "ORDER BY price_cents, sku LIMIT 20")
Q_CITY = ("SELECT c.city, COUNT(DISTINCT c.id), COUNT(o.id), SUM(o.total_cents) FROM customers c "
          "JOIN orders o ON o.customer_id = c.id WHERE c.country = ? AND o.ordered_at >= ? AND o.ordered_at < ? "
          "GROUP BY c.city ORDER BY c.city")
# (query, share of the requests)
_KINDS = [(Q_EMAIL, 0.15), (Q_RECENT, 0.20), (Q_ORDER, 0.25), (Q_WINDOW, 0.10), (Q_DAILY, 0.08), (Q_TOP, 0.08),
          (Q_PRICE, 0.10), (Q_CITY, 0.04)]


def request_mix(info: ImageInfo, n: int, seed: int, hot: float = 0.75, hot_seed: int = 99) -> list:
    """n requests ([sql, params]) against info's database. A share `hot` of
    them draw their keys from a hot set fixed by hot_seed (regular
    customers, the newest orders, the last month), the rest from anywhere,
    both with the generator of `seed`: two mixes with the same hot_seed and
    different seeds share most of their working set."""
    hrng = np.random.default_rng(hot_seed)
    hot_customers = hrng.choice(info.customers, size=max(5, info.customers // 50), replace=False) + 1
    recent_orders = max(20, info.orders // 20)  # the newest 5 % of orders
    recent_days = 30
    # The database is queried for e-mails, which the generator made from the
    # same draws: read them back here (the parent has the file).
    con = sqlite3.connect(f"file:{info.image}.db?mode=ro", uri=True)
    emails = dict(con.execute("SELECT id, email FROM customers"))
    cities = sorted({c for c, in con.execute("SELECT DISTINCT country FROM customers")})
    con.close()
    rng = np.random.default_rng(seed)
    kinds = rng.choice(len(_KINDS), size=n, p=[w for _, w in _KINDS])
    out = []

    def day(is_hot: bool) -> int:
        return int(info.days - 1 - rng.integers(0, recent_days)) if is_hot else int(rng.integers(0, info.days))

    def stamp(d: int, sec: int = 0) -> str:
        return str(_T0 + np.timedelta64(d * 86400 + sec, "s")).replace("T", " ")

    def order_id(is_hot: bool) -> int:
        if is_hot:
            return int(info.orders - rng.integers(0, recent_orders))
        return int(rng.integers(1, info.orders + 1))

    def customer(is_hot: bool) -> int:
        if is_hot:  # regulars, Zipf-like: a few are very frequent
            return int(hot_customers[min(len(hot_customers) - 1, int(rng.zipf(1.5)) - 1)])
        return int(rng.integers(1, info.customers + 1))

    for k in kinds:
        q = _KINDS[k][0]
        h = bool(rng.random() < hot)
        if q == Q_EMAIL:
            params = [emails[customer(h)]]
        elif q == Q_RECENT:
            params = [customer(h)]
        elif q == Q_ORDER:
            params = [order_id(h)]
        elif q == Q_WINDOW:
            d, s = day(h), int(rng.integers(0, 86400 - 7200))
            params = [stamp(d, s), stamp(d, s + 7200)]
        elif q == Q_DAILY:
            d = day(h)
            params = [stamp(d), stamp(d + 1)]
        elif q == Q_TOP:
            last = order_id(h)
            params = [max(1, last - 300), last, _CATEGORIES[int(rng.integers(0, len(_CATEGORIES)))]]
        elif q == Q_PRICE:
            lo = int(rng.lognormal(7.5, 1.0))
            params = [_CATEGORIES[int(rng.integers(0, len(_CATEGORIES)))], lo, lo * 2]
        else:
            d = day(h)
            params = [cities[int(rng.integers(0, len(cities)))], stamp(d), stamp(d + 2)]
        out.append([q, params])
    return out


def mixes(info: ImageInfo, n: int = 400) -> tuple[list, list]:
    """Mix A (recorded) and mix B (measured): the same hot set, different draws."""
    return request_mix(info, n, seed=1), request_mix(info, n, seed=2)


def reference_answers(info: ImageInfo, requests: list) -> list:
    """The answers of Python's sqlite3 module on the database file (an
    independent check of the guest's own SQLite driver)."""
    con = sqlite3.connect(f"file:{info.image}.db?mode=ro", uri=True)
    try:
        return [[list(r) for r in con.execute(q, p)] for q, p in requests]
    finally:
        con.close()


def check_answers(got: list, want: list, what: str) -> None:
    if got != want:
        bad = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        raise RuntimeError(f"{what}: answer {bad} differs from the resident run's "
                           f"({len(got)} answers, {len(want)} expected)")


# -- the rows of the comparison ----------------------------------------------------------


def realistic_rows(work: Path, rounds: int, size_mib: int = 256, *, db_mib: Optional[float] = None,
                   requests: int = 400, log: Callable[[str], None] = lambda s: None,
                   strategies: Optional[list[str]] = None, caches: tuple[str, ...] = ("warm",),
                   detail: Optional[Callable] = None, **server_kw) -> list[Row]:
    """The SQLite workload: one Row per cache state (bench.pagecache:
    "warm" or "cold", set on the files each strategy reads before each of
    its runs), `rounds` interleaved runs of each strategy, of guests
    answering mix B after mix A was recorded, served by in-process Servers.
    server_kw go to every Server (l1, persist_logs, use_plan, host_cache
    and, while recording, fault_around are set here and win). detail(stats,
    prefetched, None) makes what a served run did into the row's details."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    size = size_mib << 20
    image = work / "sql.img"
    info = build_image(image, size, db_mib)
    mix_a, mix_b = mixes(info, requests)
    files = {}
    for name, mix in (("A", mix_a), ("B", mix_b)):
        files[name] = work / f"mix-{name}.json"
        files[name].write_text(json.dumps(mix))
    log(f"sqlite: {info.db_length / 2**20:.1f} MiB database ({info.customers} customers, {info.products} products, "
        f"{info.orders} orders) at offset {info.db_offset:#x} of {size_mib} MiB; {requests} queries per mix")

    store_dir = work / "store"
    store = DurableStore(f"file://{store_dir}")
    create_snapshot(store, image, "sqlite", warm_l2=server_kw.get("l2"))
    snap = Snapshot.open(store, "sqlite")
    l1 = L1Cache(work / "l1")
    snap.fill_l1(l1)
    host = HostCache(work / "host")
    n_sock = iter(range(10**6))

    def guest(backing: str, mix: str, **kw):
        return run_guest(backing, size, info.db_offset, info.db_length, files[mix], **kw)

    def served(mix: str, use_plan: bool, **kw):
        # The plan is recorded page by page (below): a replaying server says so,
        # for its prefetch to install page by page too (a lazy one would take
        # it as its own fault-around).
        plan_kw = {"record_fault_around": 1} if use_plan else {}
        opts = {"l1": l1, "persist_logs": False, "host_cache": host, **plan_kw, **server_kw, "use_plan": use_plan,
                **kw}
        settings, opts = ServerSettings.take(opts)
        with Server(snap, work / f"q{next(n_sock)}.sock", settings, **opts) as server:
            try:
                res = guest("uffd", mix, socket_path=server.socket_path)
            except GuestFailure as exc:  # say why the handler refused it, if it did
                refused = list(getattr(server, "refused", []))
                raise GuestFailure(f"{exc}{'; ' + refused[-1] if refused else ''}") from None
        summary = server.summaries[-1]
        return res, (detail(summary.stats, summary.prefetched, None) if detail else None)

    def served_empty():
        """Replay with a new, empty host cache, removed afterwards (a host
        fills a version once: its dirty pages must not pile up)."""
        hc = HostCache(work / f"host-{next(n_sock)}")
        try:
            return served("B", True, host_cache=hc)
        finally:
            shutil.rmtree(hc.root)

    def local(backing: str, mix: str):
        return guest(backing, mix, image=image), None

    try:
        # The references: the resident guest, itself checked against Python's sqlite3.
        want = {}
        for mix, requests_ in (("A", mix_a), ("B", mix_b)):
            want[mix] = local("resident", mix)[0].answers
            check_answers(want[mix], reference_answers(info, requests_), f"resident guest, mix {mix}, vs sqlite3")
        rows_b = sum(len(a) for a in want["B"])
        if rows_b == 0 or sum(1 for a in want["B"] if a) < len(mix_b) // 2:
            raise RuntimeError("mix B's answers are mostly empty: the workload would not touch the database")

        # Record mix A: every first touch faults (fault-around 1), the log becomes the plan.
        res, _ = served("A", False, persist_logs=True, fault_around=1, host_cache=None)
        check_answers(res.answers, want["A"], "recording, mix A")
        plan = rebuild_plan(store, snap.manifest, sessions=1)
        log(f"sqlite: plan of {plan.pages} pages ({plan.pages * P / 2**20:.1f} MiB) from mix A")
        host.fill(snap)  # every chunk decoded into the kept host cache before the rounds

        run = {
            "resident": lambda: local("resident", "B"),
            "mmap": lambda: local("mmap", "B"),
            "uffd-lazy": lambda: served("B", False),
            "uffd-replay": lambda: served("B", True),
            "uffd-replay-l1": lambda: served("B", True, host_cache=None),
            "uffd-replay-hc-empty": served_empty,
        }
        read = {s: [image] if s in ("resident", "mmap") else [l1.root, store_dir, host.root] for s in run}
        read["uffd-replay-l1"] = read["uffd-replay-hc-empty"] = [l1.root, store_dir]
        chosen = [s for s in STRATEGIES if strategies is None or s in strategies]
        name = f"sqlite: {requests} queries, {info.db_length / 2**20:.0f} MiB database in {size_mib} MiB, not the recorded mix"
        rows = {c: Row(f"sqlite/{c}", name, "L1 and host cache local", c, "in-process",
                       "restore start to the last answer (as the guest measures it)", "mmap") for c in caches}
        for c, row in rows.items():  # each cache state apart (bench.compare.synthetic_rows)
            for i in range(rounds):  # interleaved: one of each per round
                for s in chosen:
                    resident = pagecache.set_state(c, read[s])
                    res, d = run[s]()
                    check_answers(res.answers, want["B"], f"{s}, mix B")
                    row.add(s, res.ms, resident, d)
                log(f"sqlite, {c}: round {i + 1} of {rounds}")
    finally:
        snap.close()
    return list(rows.values())
