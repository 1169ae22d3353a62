// nswatch's topology page: the graph from /api/v1/topology, kept live by /api/v1/events.
// List, then watch: the graph carries the event id it is consistent with; the stream
// resumes from there. A link's state changes are applied at once; anything that changes
// the shape of the graph fetches it again (at most a few times a second).
"use strict";

const DOWN_STATES = new Set(["DOWN", "LOWERLAYERDOWN", "NOTPRESENT"]);
const COLLAPSE_OVER = 12; // namespaces in a group before it starts collapsed
const SHOW_AT_MOST = 300; // boxes drawn per group before "show more"
const MANY_LINKS = 12; // links shown in a box before "more links" (a host with 300 veths)
const EVENTS = [
  "namespace_added", "namespace_removed", "namespace_renamed",
  "link_added", "link_changed", "link_removed",
  "address_added", "address_changed", "address_removed",
  "veth_peer_resolved", "veth_peer_lost",
];

let graph = { event_id: 0, namespaces: [], edges: [] };
let source = null;
let refetchTimer = null;
let fetching = false;
const groupState = new Map(); // group -> true (open) / false (collapsed), set by the user
const showAll = new Set();
const allLinks = new Set(); // namespaces whose every link is shown
let partners = new Map(); // link id -> ids of the links it has an edge to
const $ = (id) => document.getElementById(id);

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function globRe(pattern) {
  const esc = pattern.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(/\*/g, ".*").replace(/\?/g, ".");
  return new RegExp(pattern.includes("*") || pattern.includes("?") ? `^${esc}$` : esc, "i");
}

function matches(ns, re) {
  if (!re) return true;
  if (ns.names.some((n) => re.test(n))) return true;
  return ns.links.some((l) => re.test(l.name) || l.addresses.some((a) => re.test(a)));
}

function linkRow(ns, link) {
  const row = el("div", "link");
  row.dataset.id = link.id;
  row.dataset.name = `${ns.name}/${link.name}`;
  if (link.master) row.classList.add("port");
  if (link.down) row.classList.add("down");
  row.append(el("span", "lname", link.name));
  const meta = el("span", "meta");
  row.append(meta);
  const shown = link.addresses.filter((a) => !a.startsWith("fe80:")).slice(0, 2);
  if (shown.length) row.append(el("span", "addr", shown.join(" ")));
  setState(row, link);
  return row;
}

function setState(row, link) {
  const state = link.admin_up ? link.oper_state : "DOWN";
  row.querySelector(".meta").textContent = `${link.kind} ${state}`;
  row.classList.toggle("down", link.down);
  row.title = [`${link.name} (${link.kind}, index ${link.id.split(":")[1]})`,
    `state ${state}, mtu ${link.mtu}`, link.mac ? `mac ${link.mac}` : "", ...link.addresses]
    .filter(Boolean).join("\n");
}

// Which links a box lists: all of a small namespace; of a big one, those that
// match the filter or lead to another namespace shown, then others up to the cap.
function linksToShow(ns, re, shownNs) {
  if (ns.links.length <= MANY_LINKS || allLinks.has(ns.name)) return ns.links;
  const related = (l) => (partners.get(l.id) || []).some((p) => shownNs.has(p.split(":")[0]) && !l.id.startsWith(p.split(":")[0] + ":"));
  const picked = ns.links.filter((l) => (re && (re.test(l.name) || l.addresses.some((a) => re.test(a)))) || related(l));
  if (!re) for (const l of ns.links) if (picked.length < MANY_LINKS && !picked.includes(l)) picked.push(l);
  const keep = new Set(picked.map((l) => l.id));
  for (const l of picked) if (l.master) keep.add(l.master);
  return ns.links.filter((l) => keep.has(l.id));
}

function nsBox(ns, links) {
  const box = el("div", ns.host ? "ns host" : "ns");
  box.dataset.ns = ns.name;
  const name = el("div", "name", ns.name);
  if (ns.names.length > 1) name.append(el("small", null, ` (also ${ns.names.slice(1).join(", ")})`));
  box.append(name);
  // A bridge's ports right under it.
  const ports = new Map();
  for (const l of links) if (l.master) (ports.get(l.master) || ports.set(l.master, []).get(l.master)).push(l);
  for (const l of links) {
    if (l.master && links.some((m) => m.id === l.master)) continue;
    box.append(linkRow(ns, l));
    for (const p of ports.get(l.id) || []) box.append(linkRow(ns, p));
  }
  if (links.length < ns.links.length) {
    const more = el("button", "more", `${ns.links.length - links.length} more links`);
    more.addEventListener("click", () => { allLinks.add(ns.name); render(); });
    box.append(more);
  }
  return box;
}

function render() {
  const text = $("search").value.trim();
  const re = text ? globRe(text) : null;
  const groups = new Map();
  let shown = 0;
  for (const ns of graph.namespaces) {
    if (!matches(ns, re)) continue;
    shown++;
    (groups.get(ns.group) || groups.set(ns.group, []).get(ns.group)).push(ns);
  }
  partners = new Map();
  for (const e of graph.edges) {
    (partners.get(e.a) || partners.set(e.a, []).get(e.a)).push(e.b);
    (partners.get(e.b) || partners.set(e.b, []).get(e.b)).push(e.a);
  }
  // Which boxes get drawn, first: a big box lists the links that lead to them.
  const isOpen = (name, members) =>
    groupState.has(name) ? groupState.get(name) : (re !== null || members.length <= COLLAPSE_OVER || name === "host");
  const drawn = (name, members) => members.slice(0, showAll.has(name) ? members.length : SHOW_AT_MOST);
  const shownNs = new Set();
  for (const [name, members] of groups) {
    if (isOpen(name, members)) for (const ns of drawn(name, members)) shownNs.add(String(ns.inode));
  }
  const root = $("groups");
  root.replaceChildren();
  for (const [name, members] of groups) {
    const sec = el("section", "group");
    sec.dataset.group = name;
    const open = isOpen(name, members);
    sec.classList.toggle("collapsed", !open);
    const h = el("h2", null, members.length > 1 ? `${name} (${members.length} namespaces)` : name);
    h.addEventListener("click", () => { groupState.set(name, sec.classList.contains("collapsed")); render(); });
    sec.append(h);
    const boxes = el("div", "boxes");
    if (open) {
      const shown = drawn(name, members);
      for (const ns of shown) boxes.append(nsBox(ns, linksToShow(ns, re, shownNs)));
      if (members.length > shown.length) {
        const more = el("button", "more", `show ${members.length - shown.length} more`);
        more.addEventListener("click", () => { showAll.add(name); render(); });
        boxes.append(more);
      }
    }
    sec.append(boxes);
    root.append(sec);
  }
  const links = graph.namespaces.reduce((n, ns) => n + ns.links.length, 0);
  $("summary").textContent = `${shown}/${graph.namespaces.length} namespaces, ${links} links, ${graph.edges.length} edges`;
  drawEdges();
}

function drawEdges() {
  const svg = $("edges");
  const canvas = $("canvas");
  // Measured without the old overlay, which could itself widen the page.
  svg.setAttribute("width", 0);
  svg.setAttribute("height", 0);
  const base = canvas.getBoundingClientRect();
  svg.setAttribute("width", canvas.scrollWidth);
  svg.setAttribute("height", canvas.scrollHeight);
  const rows = new Map();
  for (const row of document.querySelectorAll(".link")) rows.set(row.dataset.id, row);
  const parts = [];
  for (const e of graph.edges) {
    const a = rows.get(e.a), b = rows.get(e.b);
    if (!a || !b) continue;
    // A bridge's ports are listed indented under it: no line needed.
    if (e.kind === "master" && a.closest(".ns") === b.closest(".ns")) continue;
    const ra = a.getBoundingClientRect(), rb = b.getBoundingClientRect();
    const ay = ra.top + ra.height / 2 - base.top, by = rb.top + rb.height / 2 - base.top;
    let d;
    if (a.closest(".ns") === b.closest(".ns")) {
      const x = ra.left - base.left;
      d = `M${x},${ay} C${x - 18},${ay} ${x - 18},${by} ${x},${by}`;
    } else if (Math.abs(ra.left - rb.left) < 4) {
      const x1 = ra.right - base.left, x2 = rb.right - base.left;
      d = `M${x1},${ay} C${x1 + 40},${ay} ${x2 + 40},${by} ${x2},${by}`;
    } else {
      const [l, r, ly, ry] = ra.left < rb.left ? [ra, rb, ay, by] : [rb, ra, by, ay];
      const x1 = l.right - base.left, x2 = r.left - base.left, mid = (x1 + x2) / 2;
      d = `M${x1},${ly} C${mid},${ly} ${mid},${ry} ${x2},${ry}`;
    }
    parts.push(`<path class="${e.kind}" data-a="${e.a}" data-b="${e.b}" d="${d}"></path>`);
  }
  svg.innerHTML = parts.join("");
}

async function refetch() {
  if (fetching) { scheduleRefetch(); return; }
  fetching = true;
  try {
    const r = await fetch("api/v1/topology", { cache: "no-store" });
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    graph = await r.json();
    render();
    if (!source) connect();
  } catch (err) {
    status(`error: ${err.message}`, false);
    scheduleRefetch(2000);
  } finally {
    fetching = false;
  }
}

function scheduleRefetch(delay = 150) {
  if (refetchTimer === null) refetchTimer = setTimeout(() => { refetchTimer = null; refetch(); }, delay);
}

function status(text, live) {
  const s = $("status");
  s.textContent = text;
  s.classList.toggle("live", live);
}

function onLinkChanged(data) {
  for (const ns of graph.namespaces) {
    if (ns.name !== data.netns) continue;
    const link = ns.links.find((l) => l.index === data.ifindex);
    if (!link) break;
    if (link.name !== data.link || link.kind !== data.kind) scheduleRefetch();
    link.admin_up = data.admin_up;
    link.oper_state = data.oper_state;
    link.down = !data.admin_up || DOWN_STATES.has(data.oper_state);
    const row = document.querySelector(`.link[data-id="${link.id}"]`);
    if (row) setState(row, link);
    return;
  }
  scheduleRefetch();
}

function connect() {
  source = new EventSource(`api/v1/events?since=${graph.event_id}`);
  source.onopen = () => status("live", true);
  source.onerror = () => status("reconnecting…", false);
  for (const name of EVENTS) {
    source.addEventListener(name, (ev) => {
      const data = JSON.parse(ev.data);
      status(`live · event ${data.id}`, true);
      if (name === "link_changed") onLinkChanged(data);
      else scheduleRefetch();
    });
  }
  source.addEventListener("resync", () => {
    // Too far behind: read the graph again and follow the stream from its id.
    source.close();
    source = null;
    refetch();
  });
}

$("search").addEventListener("input", () => render());
$("expand").addEventListener("click", () => { for (const ns of graph.namespaces) groupState.set(ns.group, true); render(); });
$("collapse").addEventListener("click", () => { for (const ns of graph.namespaces) groupState.set(ns.group, ns.group === "host"); render(); });
window.addEventListener("resize", () => drawEdges());
const query = new URLSearchParams(location.search).get("q");
if (query) $("search").value = query;
refetch();
