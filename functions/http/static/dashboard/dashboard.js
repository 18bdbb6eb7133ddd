// The taskrunner dashboard: reads the JSON API from the browser and draws it.
//
// No framework, no build step, no chart library, nothing vendored (issue 24.8, weighed as the
// page grew from two views to seven):
// - uPlot (about 50 KB minified) would draw the two charts, which are a few SVG paths below: less code
//   than its configuration, and their hover titles are plain SVG a test can read.
// - Alpine.js evaluates its attributes with `new Function`, which the page's Content-Security-
//   Policy forbids (script-src 'self', no 'unsafe-eval': a task's text can never become code);
//   its CSP build drops the expressions that make it worth having.
// - htmx swaps in HTML that a server renders, while this API answers JSON (and the Lambda
//   deployment serves the same JSON): it would need a second, HTML-rendering API.
// So every view is a function that reads the JSON API and builds its elements with h(), which
// sets text with text nodes (never innerHTML): a task's output, error, traceback, worker or
// schedule name is always text, never markup. Each view is 20 to 80 lines; a library would
// save little of that and add a file to keep current, which is the trade against it.

const BASE = document.documentElement.dataset.base || "";
const KINDS = (document.documentElement.dataset.kinds || "").split(" ").filter(Boolean);
const STATES = ["scheduled", "running", "succeeded", "failed", "cancelled"];
const REFRESH_MS = 3000;
// A task shown while it is due or running is looked at more often: its result is near.
const WATCH_MS = 1000;
const PAGE_SIZE = 25;
// The most tasks one bulk action takes (the API's `limit` at most, model.MAX_BULK).
const BULK_MAX = 10000;
const ATTEMPTS_PAGE = 25;
// When a card turns amber and red (docs/operations.md, "The dashboard's cards").
const OLDEST_AMBER_S = 60;
const OLDEST_RED_S = 300;
const FAILURES_WINDOW_MIN = 5;
const FAILURES_RISING_MIN = 5;
const FAILURES_RED_MIN = 10;
const TOKEN_KEY = "taskrunner.token";
const SVG = "http://www.w3.org/2000/svg";

const $ = (id) => document.getElementById(id);
const VIEWS = ["overview", "tasks", "failures", "schedules", "workers", "task"];

// --- The API ------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

// A 401 stops everything until a token is given; callers only need to stop.
class NeedToken extends Error {}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** The API's `detail`, in words: a string, or FastAPI's list of issues. */
function describe(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((i) => `${(i.loc || []).filter((x) => x !== "body").join(".")}: ${i.msg}`)
      .join("; ");
  }
  return `the API answered ${status}`;
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const sent = token();
  if (sent) headers.Authorization = `Bearer ${sent}`;
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(BASE + path, init);
  } catch (error) {
    throw new ApiError(0, `cannot reach the API (${error.message})`);
  }
  if (response.status === 401) {
    askForToken(sent ? "That token was refused." : "");
    throw new NeedToken();
  }
  let data = null;
  if (response.status !== 204) {
    try {
      data = await response.json();
    } catch {
      data = null;
    }
  }
  if (!response.ok) throw new ApiError(response.status, describe(response.status, data));
  return data;
}

// --- Small helpers ------------------------------------------------------------------------

/** An element with attributes and children (strings become text). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  for (const child of children) el.append(child instanceof Node ? child : String(child));
  return el;
}

const number = new Intl.NumberFormat();

function fmtNumber(n) {
  return number.format(n);
}

function fmtMs(ms) {
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(ms < 10 ? 1 : 0)} ms`;
  return fmtSeconds(ms / 1000);
}

function fmtSeconds(s) {
  if (s === 0) return "0 s";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.round((s % 86400) / 3600)} h`;
}

function utc(iso) {
  return iso.replace("T", " ").replace(/Z$|\+00:00$/, " UTC");
}

/** A <time> in the viewer's local time, with the UTC time in its title. */
function fmtTime(iso) {
  if (!iso) return h("span", { class: "muted" }, "–");
  const date = new Date(iso);
  return h("time", { datetime: iso, title: utc(iso) }, date.toLocaleString());
}

/** The ISO-8601 instant of a datetime-local input's value (read in the viewer's zone). */
function instantOf(localValue) {
  const date = new Date(localValue);
  if (Number.isNaN(date.getTime())) throw new ApiError(0, "that time cannot be read");
  return date.toISOString();
}

/** A datetime-local value for `date`, in the viewer's zone, to the second. */
function localValue(date) {
  const pad = (n) => String(n).padStart(2, "0");
  return (
    `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}` +
    `T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
  );
}

function badge(state) {
  return h("span", { class: `badge ${state}` }, state);
}

function show(el, text) {
  el.textContent = text || "";
  el.hidden = !text;
}

function setText(id, text) {
  const el = $(id);
  if (el.textContent !== text) el.textContent = text;
}

// --- Token --------------------------------------------------------------------------------

let waitingForToken = false;

function askForToken(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  waitingForToken = true;
  for (const id of VIEWS) $(`${id}-view`).hidden = true;
  $("forget-token").hidden = true;
  $("token-view").hidden = false;
  show($("token-error"), message);
  $("token-input").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("token-input").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token-input").value = "";
  $("token-view").hidden = true;
  waitingForToken = false;
  route();
});

$("forget-token").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
});

// --- Charts -------------------------------------------------------------------------------

/** The smallest of 1, 2, 5 x 10^n at or above `value` (at least `floor`). */
function niceMax(value, floor) {
  const target = Math.max(value, floor);
  const power = 10 ** Math.floor(Math.log10(target));
  for (const step of [1, 2, 5, 10]) if (step * power >= target) return step * power;
  return 10 * power;
}

const W = 640;
const H = 220;
const PAD = { left: 48, right: 12, top: 24, bottom: 26 };

function hhmm(iso) {
  return new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

/**
 * Draw `series` (one point a minute) into the <svg> `el`: a line for each of `lines`
 * ({key, cls, area}), a y axis from 0, the minutes below, and one hover zone a minute whose
 * <title> gives that minute's figures.
 */
function drawChart(el, series, lines, { unit, floor, summary, format }) {
  const n = series.length;
  const top = niceMax(Math.max(0, ...series.flatMap((m) => lines.map((l) => m[l.key]))), floor);
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const x = (i) => PAD.left + (n > 1 ? (i * plotW) / (n - 1) : plotW / 2);
  const y = (v) => PAD.top + plotH - (v / top) * plotH;

  const parts = [svg("title", { id: `${el.id}-title` }, summary)];
  for (const fraction of [0, 0.5, 1]) {
    const value = top * fraction;
    parts.push(
      svg("line", { class: "grid", x1: PAD.left, x2: W - PAD.right, y1: y(value), y2: y(value) }),
      svg("text", { class: "axis", x: PAD.left - 6, y: y(value) + 4, "text-anchor": "end" },
        format(value)),
    );
  }
  parts.push(svg("text", { class: "axis unit", x: PAD.left, y: 10 }, unit));
  for (let i = 0; i < n; i += 15) {
    parts.push(svg("text", { class: "axis", x: x(i), y: H - 8, "text-anchor": "middle" },
      hhmm(series[i].minute)));
  }
  if (n) {
    parts.push(svg("text", { class: "axis", x: x(n - 1), y: H - 8, "text-anchor": "end" },
      hhmm(series[n - 1].minute)));
  }
  for (const line of lines) {
    const points = series.map((m, i) => `${x(i).toFixed(1)},${y(m[line.key]).toFixed(1)}`);
    if (!points.length) continue;
    if (line.area) {
      const area = `M${x(0)},${y(0)} L${points.join(" L")} L${x(n - 1)},${y(0)} Z`;
      parts.push(svg("path", { class: `area ${line.cls}`, d: area }));
    }
    parts.push(svg("path", { class: `line ${line.cls}`, d: `M${points.join(" L")}` }));
  }
  // Hover zones, one a minute: the browser shows each one's title as a tooltip.
  const step = n > 1 ? plotW / (n - 1) : plotW;
  series.forEach((m, i) => {
    const figures = lines.map((l) => `${l.label} ${format(m[l.key])}`).join(", ");
    parts.push(
      svg("rect", { class: "hover", x: x(i) - step / 2, y: PAD.top, width: step, height: plotH },
        svg("title", {}, `${hhmm(m.minute)}: ${figures}`)),
    );
  });
  el.replaceChildren(...parts);
}

const sum = (series, key) => series.reduce((total, m) => total + m[key], 0);

function drawCharts(series) {
  const started = sum(series, "started");
  const succeeded = sum(series, "succeeded");
  const failed = sum(series, "failed");
  drawChart(
    $("chart-throughput"),
    series,
    [
      { key: "started", label: "started", cls: "started" },
      { key: "succeeded", label: "succeeded", cls: "succeeded", area: true },
      { key: "failed", label: "failed", cls: "failed" },
    ],
    {
      unit: "tasks/min",
      floor: 5,
      format: (v) => fmtNumber(Math.round(v)),
      summary:
        `Tasks a minute over the last hour: ${fmtNumber(started)} started, ` +
        `${fmtNumber(succeeded)} succeeded, ${fmtNumber(failed)} failed`,
    },
  );
  const worst = Math.max(0, ...series.map((m) => m.lateness_p99_ms));
  drawChart(
    $("chart-lateness"),
    series,
    [{ key: "lateness_p99_ms", label: "p99", cls: "lateness", area: true }],
    {
      unit: "ms",
      floor: 1,
      format: (v) => (v >= 100 ? fmtNumber(Math.round(v)) : String(Math.round(v * 10) / 10)),
      summary: `Start lateness p99 a minute over the last hour: at most ${fmtMs(worst)}`,
    },
  );
}

// --- Overview -----------------------------------------------------------------------------

function tasksLink(state, kind, more = {}) {
  const query = new URLSearchParams();
  if (state) query.set("state", state);
  if (kind) query.set("type", kind);
  for (const [name, value] of Object.entries(more)) if (value) query.set(name, value);
  const text = query.toString();
  return `#/tasks${text ? `?${text}` : ""}`;
}

function drawCounts(counts, estimated) {
  const kinds = [...new Set([...KINDS, ...STATES.flatMap((s) => Object.keys(counts[s] || {}))])]
    .sort();
  const approx = (state) => (estimated.includes(state) ? "≈ " : "");
  const cell = (state, kind, n) =>
    h("td", { "data-state": state, "data-kind": kind || "all" },
      n ? h("a", { href: tasksLink(state, kind) }, approx(state) + fmtNumber(n)) : "0");

  const head = h("tr", {}, h("th", { scope: "col" }, "type"),
    STATES.map((s) => h("th", { scope: "col" }, badge(s))), h("th", { scope: "col" }, "all"));
  const rows = kinds.map((kind) => {
    const byState = STATES.map((s) => (counts[s] || {})[kind] || 0);
    return h("tr", {}, h("th", { scope: "row" }, kind),
      STATES.map((s, i) => cell(s, kind, byState[i])),
      cell(null, kind, byState.reduce((a, b) => a + b, 0)));
  });
  const totals = STATES.map((s) => Object.values(counts[s] || {}).reduce((a, b) => a + b, 0));
  const foot = h("tr", {}, h("th", { scope: "row" }, "all"),
    STATES.map((s, i) => cell(s, null, totals[i])),
    cell(null, null, totals.reduce((a, b) => a + b, 0)));

  const table = $("counts");
  table.tHead.replaceChildren(head);
  table.tBodies[0].replaceChildren(...rows);
  table.tFoot.replaceChildren(foot);
  $("estimated-note").hidden = estimated.length === 0;
}

/**
 * Colour a card amber or red, always with its reason in words beside the colour (`level`:
 * "amber", "red" or null for neither).
 */
function setLevel(card, line, level, text) {
  for (const name of ["amber", "red"]) $(card).classList.toggle(name, level === name);
  const prefix = level === "red" ? "Alert: " : level === "amber" ? "Warning: " : "";
  show($(line), level ? prefix + text : "");
  $(line).className = `level ${level || ""}`.trim();
}

/** The level of the oldest due task's wait. */
function oldestLevel(ageS) {
  if (ageS >= OLDEST_RED_S) return ["red", `a due task has waited over ${fmtSeconds(OLDEST_RED_S)}`];
  if (ageS >= OLDEST_AMBER_S) {
    return ["amber", `a due task has waited over ${fmtSeconds(OLDEST_AMBER_S)}`];
  }
  return [null, ""];
}

/**
 * The level of the failures: red when at least FAILURES_RED_MIN failed in the last
 * FAILURES_WINDOW_MIN minutes and they are half or more of what finished then; amber when
 * at least FAILURES_RISING_MIN failed then and that is more than twice the minutes before.
 */
function failuresLevel(series) {
  const recent = series.slice(-FAILURES_WINDOW_MIN);
  const before = series.slice(-2 * FAILURES_WINDOW_MIN, -FAILURES_WINDOW_MIN);
  const failed = sum(recent, "failed");
  const finished = failed + sum(recent, "succeeded");
  const earlier = sum(before, "failed");
  const window = `${FAILURES_WINDOW_MIN} min`;
  if (failed >= FAILURES_RED_MIN && failed * 2 >= finished) {
    return ["red", `${fmtNumber(failed)} of ${fmtNumber(finished)} finished in the last ${window} failed`];
  }
  if (failed >= FAILURES_RISING_MIN && failed > 2 * earlier) {
    return ["amber", `failures rising: ${fmtNumber(failed)} in the last ${window},` +
      ` ${fmtNumber(earlier)} in the ${window} before`];
  }
  return [null, ""];
}

/** The level of the due tasks: red while some are due that no live worker runs. */
function dueLevel(stats) {
  const unserved = Object.keys(stats.unserved || {}).sort();
  if (unserved.length) return ["red", `no live worker runs ${unserved.join(", ")}`];
  if (stats.due > 0 && stats.workers_alive === 0) return ["red", "tasks are due and no worker is alive"];
  return [null, ""];
}

function drawByType(byType) {
  const section = $("by-type").closest("section");
  section.hidden = !byType;
  if (!byType) return;
  const rate = (v) => (v >= 10 ? fmtNumber(Math.round(v)) : String(Math.round(v * 100) / 100));
  const late = (t, q) => (t.lateness_ms && typeof t.lateness_ms[q] === "number"
    ? fmtMs(t.lateness_ms[q]) : "–");
  const count = (t, key) => fmtNumber(t[key] || 0);
  const rows = Object.keys(byType).sort().map((kind) => {
    const t = byType[kind] || {};
    return h("tr", { "data-kind": kind },
      h("th", { scope: "row" }, kind),
      h("td", { "data-field": "per_s" }, rate(t.per_s || 0)),
      ["started", "succeeded", "failed", "retried", "timed_out", "lost", "cancelled"].map((key) =>
        h("td", { "data-field": key }, count(t, key))),
      ["p50", "p99", "max"].map((q) => h("td", { "data-field": q }, late(t, q))));
  });
  $("by-type").tBodies[0].replaceChildren(...rows);
  $("by-type-empty").hidden = rows.length > 0;
}

async function refreshOverview() {
  const stats = await api("GET", "/stats");
  setText("due", fmtNumber(stats.due));
  setText("oldest-due", fmtSeconds(stats.oldest_due_age_s));
  setLevel("card-oldest", "oldest-level", ...oldestLevel(stats.oldest_due_age_s));
  setLevel("card-due", "due-level", ...dueLevel(stats));
  setLevel("card-failures", "failures-level", ...failuresLevel(stats.series || []));
  drawByType(stats.by_type);
  setText("workers", fmtNumber(stats.workers));
  setText("workers-alive", fmtNumber(stats.workers_alive));
  setText("last-succeeded", fmtNumber(stats.last_minute.succeeded || 0));
  setText("last-failed", fmtNumber(stats.last_minute.failed || 0));
  setText("last-cancelled", fmtNumber(stats.last_minute.cancelled || 0));
  setText("last-retried", fmtNumber(stats.last_minute.retried || 0));
  setText("lateness-p99", fmtMs(stats.lateness_ms.p99));
  setText("lateness-p50", fmtMs(stats.lateness_ms.p50));
  setText("lateness-max", fmtMs(stats.lateness_ms.max));
  const unserved = Object.entries(stats.unserved || {});
  show(
    $("unserved"),
    unserved.length
      ? `Nothing runs ${unserved.map(([kind, n]) => `${kind} (${fmtNumber(n)} due)`).join(", ")}:` +
          " no worker or tick has run this type in the last 5 minutes. Its tasks wait until a" +
          " worker that loads it starts (TASKRUNNER_KINDS)."
      : "",
  );
  drawCounts(stats.counts, stats.estimated);
  drawCharts(stats.series);
}

// --- Tasks --------------------------------------------------------------------------------

// The pages seen so far under the current filters: the cursor of each (null: the first).
const paging = { key: "", cursors: [null], next: null };

// What each order is called on the page (GET /tasks's `sort`; "" is its default, -id).
const ORDERS = {
  "": "newest first", id: "oldest first", "-execute_at": "latest execute at first",
  execute_at: "earliest execute at first", "-finished_at": "finished, latest first",
  finished_at: "finished, earliest first",
};

// Filters of GET /tasks the form has no field for: a link may carry them (as the Failures
// page's do), and they are shown above the list, each with a button that drops it.
const MORE_FILTERS = [
  "created_after", "created_before", "execute_after", "execute_before", "finished_after",
  "finished_before", "schedule", "payload",
];

function filters() {
  const query = new URLSearchParams(location.hash.split("?")[1] || "");
  const sort = query.get("sort") || "";
  const more = {};
  for (const name of MORE_FILTERS) if (query.get(name)) more[name] = query.get(name);
  return { state: query.get("state") || "", type: query.get("type") || "",
           sort: sort in ORDERS ? sort : "", error: query.get("error") || "", more };
}

/** The filters shown, as GET /tasks's (and the bulk routes') query parameters. */
function filterQuery({ state, type, error, more }) {
  const query = new URLSearchParams();
  if (state) query.set("state", state);
  if (type) query.set("type", type);
  if (error) query.set("error", error);
  for (const [name, value] of Object.entries(more)) query.set(name, value);
  return query;
}

/** The filters in words, for the bulk confirmation. */
function describeFilters({ state, type, error, more }) {
  const parts = [];
  if (state) parts.push(`state ${state}`);
  if (type) parts.push(`type ${type}`);
  if (error) parts.push(`error contains “${error}”`);
  for (const [name, value] of Object.entries(more)) parts.push(`${name} ${value}`);
  return parts.length ? `Filters: ${parts.join(" · ")}.` : "No filters: every task.";
}

function drawMoreFilters(current) {
  const chips = Object.entries(current.more).map(([name, value]) => {
    const drop = h("button", { type: "button", class: "link", "aria-label": `Drop ${name}` }, "×");
    drop.addEventListener("click", () => {
      const more = { ...current.more };
      delete more[name];
      location.hash = tasksLink(current.state, current.type,
        { sort: current.sort, error: current.error, ...more });
    });
    return h("span", { class: "chip", "data-filter": name }, `${name} ${value} `, drop);
  });
  $("filter-more").replaceChildren(...chips);
  $("filter-more").hidden = chips.length === 0;
}

function excerpt(text, length = 80) {
  return text.length > length ? `${text.slice(0, length - 1)}…` : text;
}

function taskRow(task) {
  const note = task.state === "failed" || (task.error && !task.output)
    ? h("span", { class: "error-text" }, excerpt(task.error || ""))
    : excerpt(task.output || "");
  return h("tr", { "data-id": task.id },
    h("td", {}, h("a", { href: `#/tasks/${task.id}` }, `#${task.id}`)),
    h("td", {}, task.type),
    h("td", {}, badge(task.state)),
    h("td", {}, fmtTime(task.execute_at)),
    h("td", { class: "num" }, `${task.attempts} / ${task.max_attempts}`),
    h("td", {}, fmtTime(task.finished_at)),
    h("td", { class: "note" }, note));
}

async function refreshTasks() {
  const current = filters();
  const { state, type, sort, error } = current;
  const key = JSON.stringify(current);
  if (paging.key !== key) Object.assign(paging, { key, cursors: [null], next: null });
  $("filter-state").value = state;
  $("filter-type").value = type;
  $("filter-sort").value = sort;
  if (document.activeElement !== $("filter-search")) $("filter-search").value = error;
  drawMoreFilters(current);
  const query = filterQuery(current);
  query.set("limit", String(PAGE_SIZE));
  if (sort) query.set("sort", sort);
  const cursor = paging.cursors[paging.cursors.length - 1];
  if (cursor) query.set("cursor", cursor);
  let page;
  try {
    page = await api("GET", `/tasks?${query}`);
  } catch (error) {
    if (error instanceof ApiError) show($("tasks-error"), error.message);
    throw error;
  }
  show($("tasks-error"), "");
  paging.next = page.next_cursor;
  $("tasks").tBodies[0].replaceChildren(...page.items.map(taskRow));
  // (A filter its order's index does not serve reads a bounded run a page: a page may be
  // empty and still have a next one.)
  $("tasks-empty").hidden = page.items.length > 0 || Boolean(paging.next);
  $("tasks-more").hidden = page.items.length > 0 || !paging.next;
  $("page-prev").disabled = paging.cursors.length === 1;
  $("page-next").disabled = !paging.next;
  const first = (paging.cursors.length - 1) * PAGE_SIZE;
  setText("page-label", page.items.length
    ? `${first + 1}–${first + page.items.length}, ${ORDERS[sort]}`
    : "");
}

function setFilters() {
  const search = $("filter-search").value.trim();
  // A task id (`42` or `#42`) opens that task; any other text searches the tasks' errors.
  const id = search.match(/^#?([0-9]{1,19})$/);
  if (id) {
    $("filter-search").value = "";
    location.hash = `#/tasks/${id[1]}`;
    return;
  }
  location.hash = tasksLink($("filter-state").value, $("filter-type").value,
    { sort: $("filter-sort").value, error: search, ...filters().more });
}

$("filter-state").addEventListener("change", setFilters);
$("filter-type").addEventListener("change", setFilters);
$("filter-sort").addEventListener("change", setFilters);
// Enter in the search box (the form's one text field) submits it.
$("filters").addEventListener("submit", (event) => {
  event.preventDefault();
  setFilters();
});
$("page-next").addEventListener("click", () => {
  if (!paging.next) return;
  paging.cursors.push(paging.next);
  refreshNow();
});
$("page-prev").addEventListener("click", () => {
  if (paging.cursors.length > 1) paging.cursors.pop();
  refreshNow();
});

// --- Acting on every task that matches -----------------------------------------------------

const BULK = {
  retry: { verb: "Retry", done: "Retried", what: "The failed and cancelled tasks",
           effect: "are scheduled again, due now, with a fresh budget of attempts." },
  cancel: { verb: "Cancel", done: "Cancelled", what: "The scheduled and running tasks",
            effect: "are cancelled: nothing more runs for them." },
  delete: { verb: "Delete", done: "Deleted", what: "The tasks (never a running one)",
            effect: "are deleted for good, with their output and attempts." },
};
// What the open confirmation would run: its action, filters and confirmed count.
let bulkPending = null;

/** Count what `action` would take under the filters shown (a dry run), then ask. */
async function askBulk(action) {
  const current = filters();
  const query = filterQuery(current);
  query.set("limit", String(BULK_MAX));
  query.set("dry_run", "true");
  show($("tasks-error"), "");
  show($("tasks-flash"), "");
  let found;
  try {
    found = await api("POST", `/tasks/${action}?${query}`);
  } catch (error) {
    if (error instanceof ApiError) show($("tasks-error"), `${BULK[action].verb} refused: ${error.message}`);
    else if (!(error instanceof NeedToken)) throw error;
    return;
  }
  const { verb, what, effect } = BULK[action];
  const n = found.count;
  const tasks = `${fmtNumber(n)} task${n === 1 ? "" : "s"}`;
  bulkPending = n ? { action, query: filterQuery(current), count: n } : null;
  setText("bulk-confirm-title", n ? `${verb} ${tasks}?` : `No task to ${verb.toLowerCase()}`);
  setText("bulk-confirm-text", n
    ? `${what} these filters match ${effect}` +
      (found.more ? ` More than ${fmtNumber(n)} match: this takes the ${fmtNumber(n)} with the` +
        " lowest ids; do it again for the rest." : "")
    : `${what} these filters match: none.`);
  setText("bulk-confirm-filters", describeFilters(current));
  $("bulk-confirm-yes").hidden = !n;
  setText("bulk-confirm-yes", n ? `${verb} ${tasks}` : "");
  $("bulk-confirm-yes").classList.toggle("danger", action === "delete");
  $("bulk-confirm-yes").classList.toggle("primary", action !== "delete");
  $("confirm-bulk").returnValue = "";
  $("confirm-bulk").showModal();
}

/** Run the confirmed action: never on more tasks than the confirmation counted. */
async function runBulk() {
  const pending = bulkPending;
  bulkPending = null;
  if (!pending) return;
  const query = new URLSearchParams(pending.query);
  query.set("limit", String(pending.count));
  const { verb, done } = BULK[pending.action];
  try {
    const result = await api("POST", `/tasks/${pending.action}?${query}`);
    const n = result.count;
    show($("tasks-flash"), `${done} ${fmtNumber(n)} task${n === 1 ? "" : "s"}.`);
  } catch (error) {
    if (error instanceof ApiError) show($("tasks-error"), `${verb} refused: ${error.message}`);
    else if (!(error instanceof NeedToken)) throw error;
  }
  await refreshNow();
}

for (const id of ["bulk-retry", "bulk-cancel", "bulk-delete"]) {
  $(id).addEventListener("click", () => askBulk($(id).dataset.action));
}
$("confirm-bulk").addEventListener("close", () => {
  if ($("confirm-bulk").returnValue === "go") runBulk();
  else bulkPending = null;
});

$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const button = event.submitter || $("create-form").querySelector("button");
  show($("create-error"), "");
  button.disabled = true;
  try {
    const at = $("create-at").value;
    const executeAt = at ? instantOf(at) : new Date().toISOString();
    const task = await api("POST", "/tasks", { type: $("create-type").value, execute_at: executeAt });
    $("create-at").value = "";
    flash = `Task #${task.id} created.`;
    location.hash = `#/tasks/${task.id}`;
  } catch (error) {
    if (error instanceof ApiError) show($("create-error"), error.message);
    else if (!(error instanceof NeedToken)) throw error;
  } finally {
    button.disabled = false;
  }
});

// --- One task -----------------------------------------------------------------------------

let current = null;
let flash = "";

const FIELDS = [
  ["id", "id"], ["type", "type"], ["state", "state"], ["execute_at", "execute at"],
  ["next_attempt_at", "next attempt at"], ["created_at", "created at"],
  ["started_at", "started at"], ["finished_at", "finished at"], ["attempts", "attempts"],
  ["max_attempts", "max attempts"], ["idempotency_key", "idempotency key"],
];
// Shown while it runs: who holds it, since when this attempt runs, until when its lease lasts.
const RUNNING_FIELDS = [
  ["worker", "worker"], ["running_since", "running since"], ["lease_expires_at", "lease until"],
];

function drawTask(task) {
  current = task;
  setText("task-title", `Task #${task.id} · ${task.type}`);
  const fields = task.state === "running" ? [...FIELDS, ...RUNNING_FIELDS] : FIELDS;
  const rows = fields.map(([key, label]) => {
    let value = task[key];
    if (key === "state") value = badge(value);
    else if (key.endsWith("_at") || key === "running_since") value = fmtTime(value);
    else if (value === null) value = h("span", { class: "muted" }, "–");
    return [h("dt", {}, label), h("dd", { "data-field": key }, value)];
  });
  $("task-fields").replaceChildren(...rows.flat());
  setText("task-output", task.output ?? "–");
  setText("task-last-error", task.error ?? "–");
  $("task-output").classList.toggle("muted", task.output === null);
  $("task-last-error").classList.toggle("muted", task.error === null);
  const scheduled = task.state === "scheduled";
  $("action-run").disabled = !scheduled;
  $("action-reschedule").disabled = !scheduled;
  $("reschedule-at").disabled = !scheduled;
  $("action-cancel").disabled = !scheduled && task.state !== "running";
  $("action-retry").disabled = task.state !== "failed" && task.state !== "cancelled";
  $("action-delete").disabled = task.state === "running";
  setText("actions-note", {
    scheduled: "Run now makes it due at once; Reschedule moves its time; Cancel stops it for good.",
    running: "Cancel stops it at once (a line it printed already stays); otherwise it cannot be"
      + " changed or deleted until it finishes.",
    succeeded: "A finished task can only be deleted.",
    failed: "Retry schedules it again, due now, with a fresh budget of attempts.",
    cancelled: "Retry schedules it again, due now, with a fresh budget of attempts.",
  }[task.state]);
}

// The attempts shown: of which task, how many pages the viewer asked for.
const attemptsShown = { id: null, pages: 1, drawn: "" };

function outcomeBadge(outcome) {
  return outcome ? h("span", { class: `badge ${outcome}` }, outcome.replace("_", " "))
    : h("span", { class: "badge running" }, "running");
}

function attemptRow(attempt) {
  const took = attempt.finished_at
    ? fmtSeconds(Math.max(0, (Date.parse(attempt.finished_at) - Date.parse(attempt.started_at)) / 1000))
    : h("span", { class: "muted" }, "still running");
  const error = attempt.error === null ? h("span", { class: "muted" }, "–")
    : [h("span", { class: "error-text" }, attempt.error),
      attempt.traceback ? h("details", {}, h("summary", {}, "traceback"),
        h("pre", { class: "out" }, attempt.traceback)) : null];
  return h("tr", { "data-attempt": attempt.attempt },
    h("td", { class: "num" }, `#${attempt.attempt}`),
    h("td", { class: "outcome" }, outcomeBadge(attempt.outcome)),
    h("td", {}, fmtTime(attempt.started_at)),
    h("td", { class: "took" }, took),
    h("td", {}, attempt.worker ?? h("span", { class: "muted" }, "–")),
    h("td", { class: "note" }, error));
}

async function refreshAttempts(id) {
  if (attemptsShown.id !== id) Object.assign(attemptsShown, { id, pages: 1 });
  const items = [];
  let cursor = null;
  let next = null;
  try {
    for (let page = 0; page < attemptsShown.pages; page += 1) {
      const query = new URLSearchParams({ limit: String(ATTEMPTS_PAGE) });
      if (cursor) query.set("cursor", cursor);
      const answer = await api("GET", `/tasks/${id}/attempts?${query}`);
      items.push(...answer.items);
      next = answer.next_cursor;
      if (!next) break;
      cursor = next;
    }
  } catch (error) {
    if (!(error instanceof ApiError)) throw error;
    show($("attempts-error"), `The attempts cannot be read: ${error.message}`);
    return;
  }
  show($("attempts-error"), "");
  // Drawn again only when they changed: a traceback opened stays open across refreshes.
  const drawn = JSON.stringify([id, items, next]);
  if (attemptsShown.drawn === drawn) return;
  attemptsShown.drawn = drawn;
  $("attempts").tBodies[0].replaceChildren(...items.map(attemptRow));
  $("attempts-empty").hidden = items.length > 0;
  $("attempts-more").hidden = !next;
}

$("attempts-more").addEventListener("click", () => {
  attemptsShown.pages += 1;
  refreshNow();
});

async function refreshTask(id) {
  try {
    drawTask(await api("GET", `/tasks/${id}`));
    await refreshAttempts(id);
  } catch (error) {
    if (error instanceof ApiError && error.status === 404) {
      current = null;
      setText("task-title", `Task #${id}`);
      $("task-fields").replaceChildren();
      show($("task-error"), "There is no such task (it was deleted, or pruned once finished).");
      for (const b of ["action-run", "action-cancel", "action-retry", "action-delete",
        "action-reschedule"]) {
        $(b).disabled = true;
      }
      return;
    }
    throw error;
  }
}

/** Run an action on the task shown; show the API's refusal, or what was done. */
async function act(label, method, suffix, body) {
  if (!current) return;
  const id = current.id;
  show($("task-error"), "");
  show($("task-flash"), "");
  try {
    const task = await api(method, `/tasks/${id}${suffix}`, body);
    if (method === "DELETE") {
      flash = "";
      tasksFlash = `Task #${id} deleted.`;
      location.hash = lastList;
      return;
    }
    drawTask(task);
    show($("task-flash"), `${label}: done.`);
  } catch (error) {
    if (error instanceof ApiError) show($("task-error"), `${label} refused: ${error.message}`);
    else if (!(error instanceof NeedToken)) throw error;
  }
}

let tasksFlash = "";
// The list as last seen, filters included: where "← Tasks" and a deletion lead back to.
let lastList = "#/tasks";

$("action-run").addEventListener("click", () => act("Run now", "POST", "/run"));
$("action-cancel").addEventListener("click", () => act("Cancel", "POST", "/cancel"));
$("action-retry").addEventListener("click", () => act("Retry", "POST", "/retry"));
$("action-delete").addEventListener("click", () => {
  $("confirm-delete").returnValue = "";
  $("confirm-delete").showModal();
});
$("confirm-delete").addEventListener("close", () => {
  if ($("confirm-delete").returnValue === "delete") act("Delete", "DELETE", "");
});
$("reschedule-form").addEventListener("submit", (event) => {
  event.preventDefault();
  let executeAt;
  try {
    executeAt = instantOf($("reschedule-at").value);
  } catch (error) {
    show($("task-error"), error.message);
    return;
  }
  act("Reschedule", "PATCH", "", { execute_at: executeAt });
});

// --- Schedules ----------------------------------------------------------------------------

const schedulePaging = { cursors: [null], next: null };

function scheduleRow(schedule) {
  const last = schedule.last_task;
  const toggle = h("button", {
    type: "button",
    class: "toggle",
    "data-name": schedule.name,
    "aria-pressed": schedule.enabled ? "true" : "false",
  }, schedule.enabled ? "Disable" : "Enable");
  toggle.addEventListener("click", () => toggleSchedule(schedule.name, !schedule.enabled));
  const zone = schedule.timezone === "UTC" ? "" : ` (${schedule.timezone})`;
  return h("tr", { "data-name": schedule.name },
    h("td", {}, schedule.name),
    h("td", {}, schedule.type),
    h("td", {}, h("code", {}, schedule.cron), zone),
    h("td", { class: "next-run" }, schedule.enabled ? fmtTime(schedule.next_run_at) : "disabled"),
    h("td", { class: "last-task" }, last
      ? [h("a", { href: `#/tasks/${last.id}` }, `#${last.id}`), " ", badge(last.state)]
      : h("span", { class: "muted" }, "–")),
    h("td", {}, toggle));
}

async function refreshSchedules() {
  const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
  const cursor = schedulePaging.cursors[schedulePaging.cursors.length - 1];
  if (cursor) query.set("cursor", cursor);
  let page;
  try {
    page = await api("GET", `/schedules?${query}`);
  } catch (error) {
    if (error instanceof ApiError) show($("schedules-error"), error.message);
    throw error;
  }
  show($("schedules-error"), "");
  schedulePaging.next = page.next_cursor;
  $("schedules").tBodies[0].replaceChildren(...page.items.map(scheduleRow));
  $("schedules-empty").hidden = page.items.length > 0;
  $("schedules-prev").disabled = schedulePaging.cursors.length === 1;
  $("schedules-next").disabled = !schedulePaging.next;
}

async function toggleSchedule(name, enabled) {
  show($("schedules-error"), "");
  try {
    await api("PATCH", `/schedules/${encodeURIComponent(name)}`, { enabled });
    show($("schedules-flash"), `${name} ${enabled ? "enabled" : "disabled"}.`);
  } catch (error) {
    if (error instanceof ApiError) show($("schedules-error"), error.message);
    else if (!(error instanceof NeedToken)) throw error;
  }
  await refreshNow();
}

$("schedules-next").addEventListener("click", () => {
  if (!schedulePaging.next) return;
  schedulePaging.cursors.push(schedulePaging.next);
  refreshNow();
});
$("schedules-prev").addEventListener("click", () => {
  if (schedulePaging.cursors.length > 1) schedulePaging.cursors.pop();
  refreshNow();
});

// --- Failures -----------------------------------------------------------------------------

function failureFilters() {
  const query = new URLSearchParams(location.hash.split("?")[1] || "");
  const since = query.get("since") || "";
  return { since: /^[0-9]+$/.test(since) ? since : "", type: query.get("type") || "" };
}

function failureRow(group) {
  // The text GET /tasks's `error` finds this group's tasks by, as GET /errors gives it (at most
  // 200 characters, whole: cut here in UTF-16 units, it could split a surrogate pair).
  const search = group.search || "";
  return h("tr", { "data-type": group.type },
    h("td", {}, group.type),
    h("td", { class: "note" }, h("span", { class: "error-text", title: group.error },
      excerpt(group.error || "", 160))),
    h("td", { class: "num" }, fmtNumber(group.count)),
    h("td", {}, fmtTime(group.first_seen)),
    h("td", {}, fmtTime(group.last_seen)),
    h("td", {}, group.sample_task
      ? h("a", { href: `#/tasks/${group.sample_task}` }, `#${group.sample_task}`) : "–"),
    h("td", {}, h("a", { class: "group-tasks", href: tasksLink(null, group.type,
      { error: search }) }, "its tasks →")));
}

async function refreshFailures() {
  const { since, type } = failureFilters();
  $("failures-since").value = since;
  $("failures-type").value = type;
  const query = new URLSearchParams();
  if (since) query.set("since", new Date(Date.now() - Number(since) * 1000).toISOString());
  if (type) query.set("type", type);
  let answer;
  try {
    answer = await api("GET", `/errors${query.size ? `?${query}` : ""}`);
  } catch (error) {
    if (error instanceof ApiError) show($("failures-error"), error.message);
    throw error;
  }
  show($("failures-error"), "");
  $("failures").tBodies[0].replaceChildren(...answer.items.map(failureRow));
  $("failures-empty").hidden = answer.items.length > 0;
}

function setFailureFilters() {
  const query = new URLSearchParams();
  if ($("failures-since").value) query.set("since", $("failures-since").value);
  if ($("failures-type").value) query.set("type", $("failures-type").value);
  location.hash = `#/failures${query.size ? `?${query}` : ""}`;
}

$("failures-since").addEventListener("change", setFailureFilters);
$("failures-type").addEventListener("change", setFailureFilters);

// --- Workers ------------------------------------------------------------------------------

function workerRow(worker) {
  const who = worker.host === null ? worker.id : `${worker.host} · pid ${worker.pid}`;
  return h("tr", { "data-id": worker.id },
    h("td", { title: worker.id }, who, worker.tick ? " (tick)" : ""),
    h("td", { class: "state" }, worker.state),
    h("td", { class: "running" }, fmtNumber(worker.running)),
    h("td", {}, (worker.kinds ?? []).join(", ")),
    h("td", {}, fmtTime(worker.started_at)),
    h("td", {}, fmtTime(worker.last_heartbeat_at)),
    h("td", {}, fmtTime(worker.lease_expires_at)),
    h("td", { class: "rescued" }, fmtNumber(worker.rescued)),
    h("td", {}, worker.version ?? "–"));
}

async function refreshWorkers() {
  let answer;
  try {
    answer = await api("GET", "/workers");
  } catch (error) {
    if (error instanceof ApiError) show($("workers-error"), error.message);
    throw error;
  }
  show($("workers-error"), "");
  $("workers-table").tBodies[0].replaceChildren(...answer.workers.map(workerRow));
  $("workers-empty").hidden = answer.workers.length > 0;
}

// --- Views and refreshing -----------------------------------------------------------------

function view() {
  const path = location.hash.replace(/^#/, "").split("?")[0] || "/";
  const match = path.match(/^\/tasks\/(\d+)$/);
  if (match) return { name: "task", id: match[1] };
  if (path === "/tasks") return { name: "tasks" };
  if (path === "/failures") return { name: "failures" };
  if (path === "/schedules") return { name: "schedules" };
  if (path === "/workers") return { name: "workers" };
  return { name: "overview" };
}

let timer = null;
let running = null;

async function refresh() {
  if (waitingForToken) return;
  const v = view();
  try {
    if (v.name === "overview") await refreshOverview();
    else if (v.name === "tasks") await refreshTasks();
    else if (v.name === "failures") await refreshFailures();
    else if (v.name === "schedules") await refreshSchedules();
    else if (v.name === "workers") await refreshWorkers();
    else await refreshTask(v.id);
    show($("banner"), "");
    setText("updated", `Updated ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    if (error instanceof NeedToken) return;
    if (!(error instanceof ApiError)) throw error;
    show($("banner"), `Could not refresh: ${error.message}`);
  }
}

/** Refresh now (once any refresh under way is done), then every REFRESH_MS while visible. */
async function refreshNow() {
  clearTimeout(timer);
  while (running) await running;
  running = refresh().finally(() => {
    running = null;
  });
  await running;
  clearTimeout(timer);
  if (!waitingForToken && !document.hidden) timer = setTimeout(refreshNow, interval());
}

function interval() {
  if (view().name !== "task" || !current) return REFRESH_MS;
  const due = current.state === "scheduled" && Date.parse(current.next_attempt_at) <= Date.now();
  return due || current.state === "running" ? WATCH_MS : REFRESH_MS;
}

function route() {
  if (waitingForToken) return;
  const v = view();
  for (const name of VIEWS) $(`${name}-view`).hidden = v.name !== name;
  $("forget-token").hidden = !token();
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    const on = link.dataset.view === (v.name === "task" ? "tasks" : v.name);
    if (on) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (v.name === "task") {
    $("back-to-tasks").href = lastList;
    if (!current || String(current.id) !== v.id) {
      current = null;
      setText("task-title", `Task #${v.id}`);
      $("task-fields").replaceChildren();
      $("attempts").tBodies[0].replaceChildren();
      $("attempts-more").hidden = true;
      attemptsShown.drawn = "";
      $("reschedule-at").value = localValue(new Date(Date.now() + 3600_000));
    }
    show($("task-error"), "");
    show($("task-flash"), flash);
    flash = "";
  }
  if (v.name === "tasks") {
    lastList = location.hash;
    show($("tasks-flash"), tasksFlash);
    tasksFlash = "";
  }
  refreshNow();
}

for (const select of [$("create-type"), $("filter-type"), $("failures-type")]) {
  select.append(...KINDS.map((kind) => h("option", { value: kind }, kind)));
}

window.addEventListener("hashchange", route);
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) refreshNow();
});
route();
