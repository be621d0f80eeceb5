/* The orchestrator console: one file, no framework, no build step.
 *
 * It speaks the public HTTP API only, with the token in the Authorization
 * header (the service accepts tokens nowhere else). Live updates come from
 * GET /v1/events, a Server-Sent Events stream read with fetch() and parsed
 * here (EventSource cannot send headers); after a drop it reconnects with
 * Last-Event-ID and backoff. Where the stream is not served (404 and the like)
 * the page polls GET /v1/jobs every 2 s and tries the stream again now and then.
 */
"use strict";

(function () {
  const TOKEN_KEY = "orchestrator.console.token";
  const POLL_MS = 2000;
  const STREAM_RETRY_WHILE_POLLING_MS = 30000;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 30000;
  const STREAM_SILENCE_MS = 60000; // no byte at all (not even a keepalive) for this long: reconnect
  const QUEUES_MS = 5000;
  const JOB_PAGE = 50;
  const TERMINAL = new Set(["completed", "failed", "cancelled"]);
  // Used only when /openapi.json cannot be read (orchestrator/jobtypes.py).
  const FALLBACK_JOB_TYPES = [
    "sdxl_image_fast", "sdxl_image_high", "image_fast", "image_high", "video_fast",
    "video_high", "image7b_fast_enhanced", "image7b_high_enhanced",
    "video7b_fast_enhanced", "video7b_high_enhanced",
  ];

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "className") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  };
  const sleep = (ms, signal) => new Promise((resolve) => {
    const wake = () => { clearTimeout(timer); if (signal) signal.removeEventListener("abort", wake); resolve(); };
    const timer = setTimeout(wake, ms);
    if (signal) signal.addEventListener("abort", wake, { once: true });
  });

  const state = {
    token: null,
    me: null,
    session: null,          // AbortController of the current signed-in session
    jobs: new Map(),        // id -> job record (merged from list, stream and single reads)
    cards: new Map(),       // id -> the job's <li>
    lastEventId: null,      // the last durable event seen (resume point)
    mode: "idle",           // idle | connecting | live | reconnecting | polling
    jobTypes: FALLBACK_JOB_TYPES.slice(),
    pendingDetail: new Set(), // completed jobs whose signed links are being fetched
  };

  // --- small helpers ------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, body) {
      super((body && body.error) || `HTTP ${status}`);
      this.status = status;
      this.body = body;
    }
  }

  function authHeaders(extra) {
    return Object.assign({ Authorization: `Bearer ${state.token}` }, extra || {});
  }

  async function api(path, options) {
    const opts = Object.assign({ cache: "no-store" }, options || {});
    opts.headers = authHeaders(opts.headers);
    const resp = await fetch(path, opts);
    let body = null;
    try { body = await resp.json(); } catch (e) { body = null; }
    if (!resp.ok) {
      if (resp.status === 401) signedOut(body && body.error);
      throw new ApiError(resp.status, body);
    }
    return body;
  }

  function notice(message, kind) {
    const box = $("notice");
    box.textContent = message;
    box.className = kind || "info";
    box.hidden = !message;
    clearTimeout(notice.timer);
    if (message && kind !== "error") notice.timer = setTimeout(() => { box.hidden = true; }, 6000);
  }

  function newKey() {
    if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // ISO timestamps with or without microseconds, compared to the microsecond.
  function stamp(iso) {
    const m = /^(.{19})(?:\.(\d{1,6}))?(Z|[+-]\d\d:\d\d)?$/.exec(iso || "");
    if (!m) return "";
    return m[1] + "." + (m[2] || "").padEnd(6, "0");
  }

  function seconds(value) {
    if (value === null || value === undefined || !isFinite(value)) return "";
    const s = Math.max(0, Math.round(value));
    if (s < 90) return `${s} s`;
    const m = Math.floor(s / 60);
    return m < 90 ? `${m} min ${s % 60} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  const isSdxl = (jobType) => /^sdxl_/.test(jobType || "");
  const isVideo = (job) => job.format === "video" || /video/.test(job.job_type || "");

  // --- connection indicator -----------------------------------------------------------------

  const MODE_TEXT = {
    idle: "not connected", connecting: "connecting…", live: "live (event stream)",
    reconnecting: "reconnecting…", polling: "polling every 2 s",
  };

  function setMode(mode) {
    state.mode = mode;
    const badge = $("connection");
    badge.dataset.mode = mode;
    badge.textContent = MODE_TEXT[mode] || mode;
  }

  // --- job types from the OpenAPI document -------------------------------------------------

  async function loadJobTypes() {
    try {
      const resp = await fetch("openapi.json", { cache: "no-store" });
      if (!resp.ok) return;
      const doc = await resp.json();
      const schemas = (doc.components && doc.components.schemas) || {};
      const fromRecord = (((schemas.JobRecord || {}).properties || {}).job_type || {}).enum;
      const fromBodies = ["SdxlJobBody", "WanImageJobBody", "VideoJobBody"].flatMap(
        (name) => ((((schemas[name] || {}).properties || {}).jobType || {}).enum) || []);
      const names = (fromRecord && fromRecord.length ? fromRecord : fromBodies)
        .filter((t) => typeof t === "string");
      if (names.length) state.jobTypes = Array.from(new Set(names));
    } catch (e) {
      /* the hard-coded list stays */
    }
  }

  function fillJobTypes() {
    const select = $("job-type");
    const chosen = select.value;
    select.replaceChildren(...state.jobTypes.map((t) => el("option", { value: t, text: t })));
    if (state.jobTypes.includes(chosen)) select.value = chosen;
    jobTypeChanged();
  }

  function jobTypeChanged() {
    const jobType = $("job-type").value;
    const sdxl = isSdxl(jobType);
    for (const node of document.querySelectorAll(".sdxl-only")) node.hidden = !sdxl;
    const num = $("num-images");
    num.max = sdxl ? "6" : "1";
    num.placeholder = sdxl ? "default 6" : "1";
    if (num.value && Number(num.value) > Number(num.max)) num.value = ""; // WAN makes one
    $("job-type-info").textContent = sdxl ? "SDXL: up to 6 images, negative prompt honoured"
      : /video/.test(jobType) ? "WAN video: one MP4" : "WAN image: one PNG";
  }

  // --- account ---------------------------------------------------------------------------

  async function signIn(token) {
    signOutQuietly();
    state.token = token;
    state.session = new AbortController();
    const session = state.session;
    try {
      await refreshMe();
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 401)) notice(`Could not read /v1/me: ${e.message}`, "error");
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    $("submit").hidden = false;
    $("jobs").hidden = false;
    await refreshJobs();
    liveLoop(session.signal);
    if (isAdmin()) queuesLoop(session.signal);
  }

  function signOutQuietly() {
    if (state.session) state.session.abort();
    state.session = null;
    state.token = null;
    state.me = null;
    state.jobs.clear();
    state.cards.clear();
    state.pendingDetail.clear();
    state.lastEventId = null;
    $("job-list").replaceChildren();
    $("jobs-empty").hidden = false;
    for (const id of ["me", "submit", "jobs", "admin"]) $(id).hidden = true;
    setMode("idle");
  }

  function signedOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    signOutQuietly();
    notice(`The token was refused${message ? `: ${message}` : ""}. Paste a fresh one.`, "error");
  }

  const isAdmin = () => !!(state.me && (state.me.roles || []).includes("admin"));

  async function refreshMe() {
    const me = await api("v1/me");
    state.me = me;
    $("me-user").textContent = me.user_id;
    $("me-balance").textContent = `${me.token_balance} credits`;
    $("me-roles").textContent = (me.roles || []).length ? me.roles.join(", ") : "(none)";
    $("me").hidden = false;
    $("admin").hidden = !isAdmin();
  }

  // --- jobs: state --------------------------------------------------------------------------

  const hasUrls = (assets) => Array.isArray(assets) && assets.length > 0 && assets.every((a) => a && a.url);

  function upsert(record, { authoritative } = {}) {
    if (!record || !record.id) return;
    const old = state.jobs.get(record.id);
    if (old && !authoritative && stamp(record.updated_at) < stamp(old.updated_at)) return; // stale
    const merged = Object.assign({}, old || {}, record);
    if (old && hasUrls(old.assets) && !hasUrls(record.assets)) merged.assets = old.assets;
    if (old && old.thumbnail && old.thumbnail.url && !(record.thumbnail && record.thumbnail.url)) {
      merged.thumbnail = old.thumbnail;
    }
    // A queued job's ETA says nothing once it runs: a new status keeps only an ETA it brings.
    if ("eta_seconds" in record || (old && old.status !== record.status)) {
      merged.etaAt = etaAt(record.eta_seconds);
    }
    state.jobs.set(record.id, merged);
    render(merged);
    if (merged.status === "completed" && !hasUrls(merged.assets)) fetchDetail(merged.id);
  }

  function etaAt(eta) {
    return eta === null || eta === undefined || !isFinite(eta) ? null : Date.now() + eta * 1000;
  }

  async function fetchDetail(jobId) {
    if (state.pendingDetail.has(jobId)) return;
    state.pendingDetail.add(jobId);
    try {
      upsert(await api(`v1/jobs/${encodeURIComponent(jobId)}`), { authoritative: true });
    } catch (e) {
      /* the next poll or event tries again */
    } finally {
      state.pendingDetail.delete(jobId);
    }
  }

  async function refreshJobs() {
    const page = await api(`v1/jobs?limit=${JOB_PAGE}`);
    for (const job of page.jobs.slice().reverse()) upsert(job);
  }

  // --- jobs: rendering ----------------------------------------------------------------------

  function card(job) {
    let li = state.cards.get(job.id);
    if (li) return li;
    li = el("li", { className: "job", "data-job-id": job.id });
    const cancel = el("button", { type: "button", className: "cancel", text: "Cancel" });
    const retry = el("button", { type: "button", className: "retry", text: "Retry" });
    cancel.addEventListener("click", () => act(job.id, "cancel", cancel));
    retry.addEventListener("click", () => act(job.id, "retry", retry));
    li.append(
      el("div", { className: "job-head" },
        el("span", { className: "job-type" }), el("span", { className: "status" }),
        el("code", { className: "job-id", title: job.id, text: job.id.slice(0, 8) }),
        el("span", { className: "actions" }, cancel, retry)),
      el("div", { className: "prompt" }),
      el("div", { className: "progress-row" },
        el("progress", { max: "100", value: "0" }), el("span", { className: "percent" }),
        el("span", { className: "queue-info" })),
      el("div", { className: "error" }),
      el("div", { className: "media" }));
    state.cards.set(job.id, li);
    // Newest first: a job created after every card shown goes on top.
    const list = $("job-list");
    const newer = Array.from(list.children).find(
      (other) => stamp((state.jobs.get(other.dataset.jobId) || {}).created_at) < stamp(job.created_at));
    list.insertBefore(li, newer || null);
    $("jobs-empty").hidden = true;
    return li;
  }

  function render(job) {
    const li = card(job);
    const q = (sel) => li.querySelector(sel);
    li.dataset.status = job.status;
    li.className = `job status-${job.status}`;
    q(".job-type").textContent = job.job_type || "";
    q(".status").textContent = job.status;
    q(".prompt").textContent = job.enhanced_prompt && job.enhanced_prompt !== job.prompt
      ? `${job.prompt}  →  ${job.enhanced_prompt}` : job.prompt || "";
    q(".prompt").title = job.negative_prompt ? `negative: ${job.negative_prompt}` : "";
    const progress = job.status === "completed" ? 100 : Number(job.progress) || 0;
    q("progress").value = progress;
    q(".percent").textContent = `${progress}%`;
    renderQueueInfo(job, q(".queue-info"));
    q(".error").textContent = job.status === "failed" && job.error_message ? job.error_message : "";
    q(".cancel").hidden = TERMINAL.has(job.status);
    q(".retry").hidden = job.status !== "failed";
    if (job.status === "completed" && hasUrls(job.assets)) renderMedia(job, q(".media"));
  }

  function renderQueueInfo(job, node) {
    const parts = [];
    if (job.status === "queued" && job.queue_position !== null && job.queue_position !== undefined) {
      parts.push(`position ${job.queue_position}`);
    }
    if (!TERMINAL.has(job.status) && job.etaAt) {
      parts.push(`ETA ${seconds((job.etaAt - Date.now()) / 1000)}`);
    }
    if (job.status === "processing" && job.attempts > 1) parts.push(`attempt ${job.attempts}/${job.max_attempts}`);
    node.textContent = parts.join(" · ");
  }

  function renderMedia(job, box) {
    for (const asset of job.assets) {
      const key = `${asset.bucket}/${asset.path}`;
      // A signed link changes on every read; an element once given one keeps it.
      if (box.querySelector(`[data-asset="${CSS.escape(key)}"]`)) continue;
      let node;
      if (isVideo(job)) {
        node = el("video", { controls: true, preload: "metadata", playsinline: true, "data-asset": key });
        if (job.thumbnail && job.thumbnail.url) node.poster = job.thumbnail.url;
        node.src = asset.url;
      } else {
        node = el("img", { alt: job.prompt || job.job_type, loading: "lazy", "data-asset": key });
        node.src = asset.url;
      }
      box.append(el("a", { href: asset.url, target: "_blank", rel: "noopener" }, node));
    }
  }

  // ETAs count down between updates.
  setInterval(() => {
    for (const job of state.jobs.values()) {
      if (!TERMINAL.has(job.status) && job.etaAt) {
        const li = state.cards.get(job.id);
        if (li) renderQueueInfo(job, li.querySelector(".queue-info"));
      }
    }
  }, 1000);

  async function act(jobId, action, button) {
    button.disabled = true;
    try {
      const answer = await api(`v1/jobs/${encodeURIComponent(jobId)}/${action}`, {
        method: "POST", headers: { "Idempotency-Key": newKey() },
      });
      upsert(answer.job || answer, { authoritative: true });
      if (answer.token_balance !== undefined) setBalance(answer.token_balance);
      else refreshMe().catch(() => {});
    } catch (e) {
      notice(`${action} failed: ${e.message}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  function setBalance(balance) {
    if (state.me) state.me.token_balance = balance;
    $("me-balance").textContent = `${balance} credits`;
  }

  // --- submitting ------------------------------------------------------------------------

  async function submitJob(event) {
    event.preventDefault();
    const jobType = $("job-type").value;
    const metadata = { prompt: $("prompt").value };
    const negative = $("negative-prompt").value.trim();
    if (isSdxl(jobType) && negative) metadata.negative_prompt = negative;
    const num = $("num-images").value.trim();
    if (num) metadata.num_images = Number(num);
    const seed = $("seed").value.trim();
    if (seed) metadata.seed = Number(seed);
    const button = $("job-submit");
    button.disabled = true;
    try {
      const answer = await api("v1/jobs", {
        method: "POST",
        headers: { "Content-Type": "application/json", "Idempotency-Key": newKey() },
        body: JSON.stringify({ jobType, metadata }),
      });
      upsert(answer.job, { authoritative: true });
      setBalance(answer.token_balance);
      notice(`Queued ${jobType} (${answer.job.id.slice(0, 8)}).`, "info");
    } catch (e) {
      const details = e.body && e.body.details ? ` ${JSON.stringify(e.body.details)}` : "";
      notice(`Not queued: ${e.message}${details}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  // --- live: the event stream, or polling where there is none ---------------------------------

  async function liveLoop(signal) {
    let backoff = BACKOFF_MIN_MS;
    while (!signal.aborted) {
      if (state.mode !== "polling") setMode(state.lastEventId === null ? "connecting" : "reconnecting");
      let resp;
      const attempt = new AbortController();
      const stop = () => attempt.abort();
      signal.addEventListener("abort", stop, { once: true });
      try {
        const headers = authHeaders({ Accept: "text/event-stream" });
        if (state.lastEventId !== null) headers["Last-Event-ID"] = state.lastEventId;
        resp = await fetch("v1/events", { headers, cache: "no-store", signal: attempt.signal });
      } catch (e) {
        signal.removeEventListener("abort", stop);
        if (signal.aborted) return;
        if (state.mode !== "polling") setMode("reconnecting");
        await sleep(backoff, signal);
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
        continue;
      }
      const type = resp.headers.get("Content-Type") || "";
      if (resp.status === 401) {
        signal.removeEventListener("abort", stop);
        signedOut();
        return;
      }
      if (!resp.ok || !type.startsWith("text/event-stream")) {
        // No stream here (yet): poll, and ask for the stream again now and then.
        signal.removeEventListener("abort", stop);
        try { await resp.body?.cancel(); } catch (e) { /* ignore */ }
        await pollFor(STREAM_RETRY_WHILE_POLLING_MS, signal);
        continue;
      }
      setMode("live");
      backoff = BACKOFF_MIN_MS;
      // What changed while we were not listening: a fresh page on the first connect, and
      // after a drop when the stream could not tell us where we were.
      if (state.lastEventId === null) refreshJobs().catch(() => {});
      try {
        await readEvents(resp.body, attempt);
      } catch (e) {
        /* a dropped connection: reconnect below */
      } finally {
        signal.removeEventListener("abort", stop);
      }
      if (signal.aborted) return;
      setMode("reconnecting");
      await sleep(backoff, signal);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    }
  }

  async function pollFor(ms, signal) {
    setMode("polling");
    const until = Date.now() + ms;
    while (!signal.aborted && Date.now() < until) {
      try {
        await refreshJobs();
      } catch (e) {
        if (e instanceof ApiError && e.status === 401) return;
      }
      await sleep(POLL_MS, signal);
    }
  }

  /* Server-Sent Events, as the HTML standard parses them: lines end in CRLF, LF or CR;
   * a blank line dispatches; ":" lines are comments (keepalives); "field: value" with one
   * optional space after the colon; data lines join with "\n"; an id containing NUL is ignored. */
  async function readEvents(body, attempt) {
    const reader = body.getReader();
    const decoder = new TextDecoder("utf-8");
    let buffer = "";
    let event = { id: null, type: "", data: [] };
    let silence = setTimeout(() => attempt.abort(), STREAM_SILENCE_MS);
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        clearTimeout(silence);
        silence = setTimeout(() => attempt.abort(), STREAM_SILENCE_MS);
        buffer += decoder.decode(value, { stream: true });
        for (;;) {
          const end = buffer.search(/\r\n|\r|\n/);
          if (end < 0) break;
          if (buffer[end] === "\r" && end === buffer.length - 1) break; // maybe CR LF split across chunks
          const line = buffer.slice(0, end);
          buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
          if (line === "") {
            if (event.data.length && event.data.join("\n") !== "") dispatch(event); // empty: nothing
            event = { id: null, type: "", data: [] };
            continue;
          }
          if (line[0] === ":") continue; // a keepalive
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let val = colon < 0 ? "" : line.slice(colon + 1);
          if (val[0] === " ") val = val.slice(1);
          if (field === "data") event.data.push(val);
          else if (field === "event") event.type = val;
          else if (field === "id" && !val.includes("\0")) event.id = val;
        }
      }
    } finally {
      clearTimeout(silence);
      try { reader.releaseLock(); } catch (e) { /* ignore */ }
    }
  }

  function dispatch(event) {
    let data;
    try { data = JSON.parse(event.data.join("\n")); } catch (e) { data = null; }
    if (event.id !== null && event.id !== "") state.lastEventId = event.id;
    if (!data) return;
    const type = event.type || "message";
    if (type === "queue") {
      const job = state.jobs.get(data.job_id);
      if (job) {
        job.queue_position = data.queue_position;
        job.eta_seconds = data.eta_seconds;
        job.etaAt = etaAt(data.eta_seconds);
        render(job);
      }
      if (isAdmin()) refreshQueuesSoon();
      return;
    }
    const entity = data.entity || type.split(".")[0];
    if (entity === "job" && data.payload && data.payload.id) {
      upsert(data.payload);
      if (TERMINAL.has(data.payload.status)) refreshMe().catch(() => {});
    } else if (data.job_id) {
      const job = state.jobs.get(data.job_id);
      if (job && job.status === "completed" && !hasUrls(job.assets)) fetchDetail(job.id);
    }
  }

  // --- admin: queues ---------------------------------------------------------------------

  let queuesTimer = null;

  function refreshQueuesSoon() {
    if (queuesTimer) return;
    queuesTimer = setTimeout(() => { queuesTimer = null; refreshQueues().catch(() => {}); }, 500);
  }

  async function refreshQueues() {
    let body;
    try {
      body = await api("v1/queues");
    } catch (e) {
      $("queues-note").textContent = e instanceof ApiError && e.status === 404
        ? "This server does not report queue statistics yet (GET /v1/queues)."
        : `Could not read the queues: ${e.message}`;
      return;
    }
    $("queues-note").textContent = `updated ${new Date().toLocaleTimeString()}`;
    const rows = (body.queues || []).map((queue) => el("tr", { "data-family": queue.family },
      el("td", { text: queue.family }), el("td", { text: queue.depth }),
      el("td", { text: seconds(queue.oldest_wait_seconds) || "–" }), el("td", { text: queue.running }),
      el("td", { text: queue.workers }),
      el("td", { text: queue.completions_per_minute ?? "–" }),
      el("td", { text: seconds(queue.p50_run_seconds) || "–" }),
      el("td", { text: seconds(queue.p95_run_seconds) || "–" })));
    $("queues").tBodies[0].replaceChildren(...rows);
  }

  async function queuesLoop(signal) {
    while (!signal.aborted) {
      await refreshQueues().catch(() => {});
      await sleep(QUEUES_MS, signal);
    }
  }

  // --- start -----------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", async () => {
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token-input").value.trim().replace(/^Bearer\s+/i, "");
      if (!token) return;
      $("token-input").value = "";
      signIn(token);
    });
    $("token-forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      signOutQuietly();
      notice("Token forgotten.", "info");
    });
    $("job-type").addEventListener("change", jobTypeChanged);
    $("job-form").addEventListener("submit", submitJob);
    fillJobTypes();
    await loadJobTypes();
    fillJobTypes();
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) signIn(saved);
  });
})();
