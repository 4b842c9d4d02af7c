// The live view: polls GET /digest every second and follows GET /live (Server-Sent Events).
// No framework and no build step: this file is served as is by the proxy's admin endpoint.
"use strict";
(function () {
  const MAX_ROWS = 300;
  const $ = (id) => document.getElementById(id);
  let paused = false;
  // With --admin-token-file, open the page as http://ADMIN/#token=...: the fragment never leaves the browser, and
  // every request below carries it as a bearer token (which is why the stream is read with fetch, not EventSource).
  const token = new URLSearchParams(location.hash.slice(1)).get("token");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const opened = new Set(); // digest shapes whose whole example is shown, kept across refreshes

  function cell(tr, text, cls) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "" : String(text);
    if (cls) td.className = cls;
    tr.appendChild(td);
    return td;
  }

  // One command or shape is a <tbody>: its figures, then its query text on a full-width second line.
  function group(cls, failed, query, shape, columns) {
    const tbody = document.createElement("tbody");
    tbody.className = cls + (failed ? " failed" : "");
    const head = document.createElement("tr");
    const detail = document.createElement("tr");
    detail.className = "detail";
    const td = cell(detail, "", "query");
    td.colSpan = columns;
    const div = document.createElement("div"); // two lines at most; a click on a digest shape opens it
    div.className = "clamp";
    div.textContent = query || "(no query text)";
    div.title = "shape " + (shape || "-");
    td.appendChild(div);
    tbody.appendChild(head);
    tbody.appendChild(detail);
    return [tbody, head];
  }

  const ns = (r) => (r.collection ? r.db + "." + r.collection : r.db);
  const ms = (x) => (x === null || x === undefined ? "-" : x.toFixed(2));

  async function refreshDigest() {
    try {
      const resp = await fetch("/digest?limit=200&sort=" + encodeURIComponent($("sort").value), { headers });
      if (!resp.ok) {
        $("digest-note").textContent = resp.status === 404 ? "the digest is off (--no-digest)" : "GET /digest: " + resp.status;
        return;
      }
      const doc = await resp.json();
      $("since").textContent = "since " + doc.since;
      $("digest-note").textContent = doc.shape_count + " shapes, " + doc.evictions + " evicted, ~" +
        Math.round(doc.memory_bytes / 1024) + " KiB";
      const table = $("digest");
      while (table.tBodies.length) table.removeChild(table.tBodies[0]);
      for (const s of doc.shapes) {
        const errors = Object.values(s.errors).reduce((a, b) => a + b, 0);
        const [tbody, tr] = group("shape", errors > 0, s.example, s.shape, 10);
        cell(tr, ns(s) || "-").title = ns(s);
        cell(tr, s.op);
        cell(tr, s.app || "-");
        cell(tr, s.count, "num");
        cell(tr, errors ? errors + " " + Object.keys(s.errors).join(",") : 0, "num");
        cell(tr, ms(s.latency_ms.p50), "num");
        cell(tr, ms(s.latency_ms.p95), "num");
        cell(tr, ms(s.latency_ms.p99), "num");
        cell(tr, ms(s.latency_ms.max), "num");
        cell(tr, ms(s.latency_ms.total), "num");
        const key = [s.shape, s.db, s.collection, s.op, s.app].join("\u0000");
        if (opened.has(key)) tbody.classList.add("open");
        tbody.addEventListener("click", () => {
          if (tbody.classList.toggle("open")) opened.add(key); else opened.delete(key);
        });
        table.appendChild(tbody);
      }
    } catch (e) {
      $("digest-note").textContent = "cannot reach the proxy: " + e;
    }
  }

  function matches(r) {
    const fns = $("f-ns").value.trim(), fop = $("f-op").value.trim(), fapp = $("f-app").value.trim();
    if (fns && !ns(r).startsWith(fns)) return false;
    if (fop && r.op.toLowerCase() !== fop.toLowerCase()) return false;
    if (fapp && r.app !== fapp) return false;
    if ($("f-errors").checked && !r.failed) return false;
    return true;
  }

  function addCommand(r) {
    if (paused || !matches(r)) return;
    const [tbody, tr] = group("cmd", r.failed, r.query, r.shape, 6);
    cell(tr, new Date(r.time).toISOString().slice(11, 23));
    cell(tr, r.app || "-");
    cell(tr, ns(r) || "-").title = ns(r);
    cell(tr, r.op);
    cell(tr, ms(r.duration_ms), "num");
    cell(tr, r.failed ? r.error : "ok");
    const table = $("stream");
    table.insertBefore(tbody, table.tBodies[0] || null);
    while (table.tBodies.length > MAX_ROWS) table.removeChild(table.tBodies[table.tBodies.length - 1]);
    if (r.dropped) $("dropped").textContent = r.dropped + " dropped (browser too slow)";
  }

  function onEvent(name, data) {
    if (name === "hello") {
      const hello = JSON.parse(data);
      $("status").textContent = "live";
      $("mode").textContent = hello.redacted ? "redacted" : "values shown (--no-redact)";
    } else if (name === "command") {
      addCommand(JSON.parse(data));
    }
  }

  // Server-Sent Events over fetch: frames end with a blank line; "event:" names one, "data:" carries it.
  async function connect() {
    for (;;) {
      try {
        const resp = await fetch("/live", { headers });
        if (!resp.ok) throw new Error("GET /live: " + resp.status);
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let end;
          while ((end = buf.indexOf("\n\n")) >= 0) {
            const frame = buf.slice(0, end);
            buf = buf.slice(end + 2);
            let name = "message", data = "";
            for (const line of frame.split("\n")) {
              if (line.startsWith("event: ")) name = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (data) onEvent(name, data);
          }
        }
      } catch (e) {
        $("status").textContent = "reconnecting… (" + e.message + ")";
      }
      $("status").textContent = "reconnecting…";
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  $("pause").addEventListener("click", () => {
    paused = !paused;
    $("pause").textContent = paused ? "resume" : "pause";
    $("pause").classList.toggle("on", paused);
  });
  $("sort").addEventListener("change", refreshDigest);
  $("reset").addEventListener("click", async () => {
    await fetch("/digest/reset", { method: "POST", headers });
    refreshDigest();
  });
  connect();
  refreshDigest();
  setInterval(refreshDigest, 1000);
})();
