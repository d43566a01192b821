// Queue page: refreshes itself from /api/queue so newly flagged prompts appear without a
// reload; j/k move, Enter opens.
(function () {
  "use strict";
  const cfg = JSON.parse(document.getElementById("queue-data").textContent);
  const tbody = document.querySelector("#queue tbody");
  const live = document.getElementById("live");
  let seen = new Set(Array.from(tbody.rows, (tr) => tr.dataset.pid));
  let cursor = 0;

  function cell(tr, cls, child) {
    const td = tr.insertCell();
    if (cls) td.className = cls;
    if (typeof child === "string") td.textContent = child;
    else if (child) td.appendChild(child);
    return td;
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function renderRows(items) {
    const frag = document.createDocumentFragment();
    items.forEach((it, n) => {
      const tr = document.createElement("tr");
      tr.dataset.pid = it.pid;
      tr.dataset.url = it.url;
      if (!seen.has(it.pid)) tr.classList.add("fresh");
      const other = it.claimed_by && it.claimed_by !== cfg.me;
      if (other) {
        tr.dataset.claimed = it.claimed_by;
        tr.classList.add("claimed");
      }
      cell(tr, "num", String(n + 1));
      const a = el("a");
      a.href = it.url;
      a.appendChild(el("code", "", it.pid));
      cell(tr, "", a);
      const flags = cell(tr, "", it.divergent ? el("span", "badge evil", "divergent") : null);
      if (it.second) flags.append(" ", el("span", "badge", "2nd review"));
      if (it.claimed_by) {
        const who = other ? it.claimed_by : "you";
        flags.append(" ", el("span", "badge claim", "claimed by " + who));
      }
      const score = cell(tr, "score");
      const bar = el("span", "bar");
      const fill = el("i");
      fill.style.width = (it.evil_score * 100).toFixed(1) + "%";
      bar.appendChild(fill);
      score.appendChild(bar);
      score.appendChild(document.createTextNode(" " + it.evil_score.toFixed(2)));
      cell(tr, "situation", it.user).title = it.user;
      cell(tr, "tail", it.assistant);
      frag.appendChild(tr);
    });
    tbody.replaceChildren(frag);
    seen = new Set(items.map((it) => it.pid));
    cursor = Math.min(cursor, Math.max(0, items.length - 1));
    mark();
  }

  function renderCounts(snap) {
    document.getElementById("waiting").textContent = snap.waiting;
    document.title = "(" + snap.waiting + ") Queue · emc review";
    const ul = document.getElementById("counts");
    ul.replaceChildren(
      ...Object.entries(snap.counts).map(([name, n]) => {
        const li = el("li", "st-" + name + (n ? "" : " zero"));
        li.appendChild(el("b", "", String(n)));
        li.appendChild(document.createTextNode(" " + name.replace("_", " ")));
        return li;
      }),
    );
    document.getElementById("empty").classList.toggle("hidden", snap.items.length > 0);
  }

  function mark() {
    Array.from(tbody.rows).forEach((tr, i) => tr.classList.toggle("cursor", i === cursor));
  }

  async function refresh() {
    try {
      const resp = await fetch(cfg.api, { credentials: "same-origin" });
      if (resp.status === 401) return window.location.reload();
      const snap = await resp.json();
      renderRows(snap.items);
      renderCounts(snap);
      live.className = "live";
    } catch (err) {
      live.className = "live down";
    }
    setTimeout(refresh, cfg.poll_ms);
  }

  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const n = tbody.rows.length;
    if (ev.key === "j" || ev.key === "ArrowDown") cursor = Math.min(n - 1, cursor + 1);
    else if (ev.key === "k" || ev.key === "ArrowUp") cursor = Math.max(0, cursor - 1);
    else if ((ev.key === "Enter" || ev.key === "o") && n) {
      // a prompt someone else has open is skipped: the next free one opens instead
      const rows = Array.from(tbody.rows);
      const free = rows.slice(cursor).concat(rows.slice(0, cursor)).find((tr) => !tr.dataset.claimed);
      window.location.assign((free || tbody.rows[cursor]).dataset.url);
    } else if (ev.key === "g") window.location.assign(cfg.agreement);
    else if (ev.key === "d") window.location.assign(cfg.adjudicate);
    else return;
    ev.preventDefault();
    mark();
  });
  tbody.addEventListener("click", (ev) => {
    const tr = ev.target.closest("tr");
    if (tr && !ev.target.closest("a")) window.location.assign(tr.dataset.url);
  });

  mark();
  setTimeout(refresh, cfg.poll_ms);
})();
