// Prompt page: keyboard-first labeling of every top-k token of every variant.
//
// Each token starts with a *suggestion* (the judge's verdict, or the last human label) that
// is shown but not yet a label. A label key (e/s/u) labels the token under the cursor and
// moves to the next unlabeled one; Enter confirms the suggestion the same way. Labeling a
// token also labels the same token in the other variants (see labelAt). When every token
// is labeled, Enter submits and opens the next prompt. The server refuses an incomplete
// submission too.
// Ten tokens the judge got right take ten Enters plus one to submit; `a` accepts every
// remaining suggestion at once (explicitly).
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const rows = data.rows.map((r) => Object.assign({}, r, { label: null }));
  const $ = (id) => document.getElementById(id);
  const rowEls = rows.map((r) => $("row-" + r.i));
  const mineEls = rowEls.map((el) => el.querySelector('[data-role="mine"]'));
  const noteEl = $("note");
  const badEl = $("bad");
  const submitEl = $("submit");
  const msgEl = $("msg");
  const undo = [];
  let cursor = 0;
  let busy = false;
  let savedNext = null;

  const undone = () => rows.filter((r) => r.label === null);
  const allDone = () => rows.length > 0 && undone().length === 0;
  const canSubmit = () => !busy && (allDone() || badEl.checked);

  function say(text, kind) {
    msgEl.textContent = text;
    msgEl.className = "msg" + (kind ? " " + kind : "");
  }

  function nextUndone(from) {
    for (let k = 1; k <= rows.length; k++) {
      const j = (from + k) % rows.length;
      if (rows[j].label === null) return j;
    }
    return from;
  }

  function render() {
    rows.forEach((r, i) => {
      const el = rowEls[i];
      el.classList.toggle("cursor", i === cursor);
      el.classList.toggle("done", r.label !== null);
      el.classList.toggle("differs", r.label !== null && r.judge !== null && r.label !== r.judge);
      const shown = r.label || r.suggestion;
      const chip = mineEls[i];
      chip.textContent = shown || "?";
      chip.className = "chip " + (shown || "none") + (r.label ? "" : " pending");
      chip.title = r.label
        ? "labeled"
        : r.suggestion
          ? "suggested by " + r.source + ": Enter confirms, e/s/u changes"
          : "no suggestion: label with e/s/u";
    });
    const done = rows.length - undone().length;
    $("done-count").textContent = done;
    submitEl.disabled = !canSubmit();
    document.body.classList.toggle("all-done", allDone());
    document.body.classList.toggle("is-bad", badEl.checked);
    rowEls[cursor] && rowEls[cursor].scrollIntoView({ block: "nearest" });
  }

  // -- actions (each pushes what it changes onto the undo stack) ------------------------
  function snapshot(indices) {
    return { cursor: cursor, bad: badEl.checked, rows: indices.map((i) => [i, rows[i].label]) };
  }

  // The same next token means the same thing whichever variant proposes it, so a label also
  // fills that token's unlabeled rows in the other variants, but only where their suggestion
  // agrees (or there is none): a conflicting suggestion is left for the reviewer to see.
  function labelAt(i, label) {
    const targets = rows
      .filter(
        (r) =>
          r.i === i ||
          (r.token_id === rows[i].token_id &&
            r.label === null &&
            (r.suggestion === null || r.suggestion === label)),
      )
      .map((r) => r.i);
    undo.push(snapshot(targets));
    targets.forEach((t) => (rows[t].label = label));
    cursor = nextUndone(i);
    say(allDone() ? "All labeled: Enter submits." : "", allDone() ? "ok" : "");
  }

  function acceptAll() {
    const targets = undone().filter((r) => r.suggestion).map((r) => r.i);
    if (!targets.length) return say("No suggestions left to accept.", "warn");
    undo.push(snapshot(targets));
    targets.forEach((t) => (rows[t].label = rows[t].suggestion));
    cursor = nextUndone(cursor);
    say(
      "Accepted " + targets.length + " suggestion(s)." + (allDone() ? " Enter submits." : ""),
      "ok",
    );
  }

  function toggleBad() {
    undo.push(snapshot([]));
    badEl.checked = !badEl.checked;
    say(badEl.checked ? "Flagged as bad prompt: Enter submits." : "", badEl.checked ? "warn" : "");
  }

  function doUndo() {
    const s = undo.pop();
    if (!s) return say("Nothing to undo.", "warn");
    s.rows.forEach(([i, label]) => (rows[i].label = label));
    cursor = s.cursor;
    badEl.checked = s.bad;
    say("Undone.");
  }

  function enter() {
    if (canSubmit()) return submit();
    if (!rows.length) return say("Nothing to label yet: flag the prompt bad (b) or come back later.", "warn");
    const r = rows[cursor];
    if (r.label === null && r.suggestion) return labelAt(cursor, r.suggestion);
    if (r.label === null) return say("No suggestion for this token: press e, s or u.", "warn");
    cursor = nextUndone(cursor);
  }

  function move(delta) {
    cursor = Math.max(0, Math.min(rows.length - 1, cursor + delta));
  }

  function otherVariant(delta) {
    const r = rows[cursor];
    const vi = data.variants.indexOf(r.variant) + delta;
    if (vi < 0 || vi >= data.variants.length) return;
    const inV = rows.filter((x) => x.variant === data.variants[vi]);
    if (inV.length) cursor = (inV.find((x) => x.rank === r.rank) || inV[inV.length - 1]).i;
  }

  async function submit() {
    if (busy) return;
    busy = true;
    submitEl.disabled = true;
    say("Saving…");
    const body = {
      labels: window.emc.labelList(rows),
      bad_prompt: badEl.checked,
      note: noteEl.value,
      base_key: data.base_key,
    };
    try {
      const out = await window.emc.postJSON(data.submit_url, body);
      document.body.classList.add("saved");
      if (out.warnings && out.warnings.length) {
        // saved in the store, but a follow-up step failed: say so before moving on
        savedNext = out.next_url;
        return say("Saved ✓ — " + out.warnings.join(" ") + " — Enter: next prompt.", "warn");
      }
      say("Saved ✓", "ok");
      window.location.assign(out.next_url);
    } catch (err) {
      busy = false;
      say("Not saved: " + err.message, "error");
      render();
    }
  }

  // -- continuations --------------------------------------------------------------------
  let pollTimer = null;
  async function sample(i) {
    const r = rows[i];
    const box = $("samples");
    box.classList.remove("hidden");
    $("samples-token").textContent = r.variant + " · " + r.token;
    $("samples-list").innerHTML = "";
    $("samples-state").textContent = "queued on the GPU worker…";
    clearTimeout(pollTimer);
    try {
      const body = { variant: r.variant, token_id: r.token_id, n: 3 };
      const out = await window.emc.postJSON(data.samples_url, body);
      poll(out.poll_url, Date.now());
    } catch (err) {
      $("samples-state").textContent = "could not ask for samples: " + err.message;
    }
  }

  async function poll(url, started) {
    try {
      const resp = await fetch(url, { credentials: "same-origin" });
      const out = await resp.json();
      if (out.ready) {
        $("samples-state").textContent = "";
        const list = $("samples-list");
        out.continuations.forEach((text) => {
          const li = document.createElement("li");
          li.textContent = text;
          list.appendChild(li);
        });
        return;
      }
    } catch (err) {
      /* keep polling: a transient error must not end the wait */
    }
    const waited = (Date.now() - started) / 1000;
    if (waited > 300) {
      $("samples-state").textContent = "no result after 5 min: is a GPU worker running?";
      return;
    }
    $("samples-state").textContent = "waiting " + Math.round(waited) + " s…";
    pollTimer = setTimeout(() => poll(url, started), 1500);
  }

  // -- input ----------------------------------------------------------------------------
  const LABEL_KEYS = { e: "evil", s: "safe", u: "unsure" };
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const t = ev.target;
    const typing = t === noteEl || (t.tagName === "INPUT" && t.type !== "checkbox");
    if (typing) {
      if (ev.key === "Escape") noteEl.blur();
      return;
    }
    if (savedNext) {
      if (ev.key === "Enter") window.location.assign(savedNext);
      return;
    }
    if (!rows.length && ev.key !== "b" && ev.key !== "Enter") return;
    let handled = true;
    const key = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
    if (LABEL_KEYS[key]) labelAt(cursor, LABEL_KEYS[key]);
    else if (key === "Enter") enter();
    else if (key === "a") acceptAll();
    else if (key === "j" || key === "ArrowDown") move(1);
    else if (key === "k" || key === "ArrowUp") move(-1);
    else if (key === "h" || key === "ArrowLeft") otherVariant(-1);
    else if (key === "l" || key === "ArrowRight") otherVariant(1);
    else if (key === "z") doUndo();
    else if (key === "b") toggleBad();
    else if (key === "n") noteEl.focus();
    else if (key === "c") sample(cursor);
    else if (key === "?") $("guide").classList.toggle("hidden");
    else if (key === "q") window.location.assign(data.queue_url);
    else handled = false;
    if (handled) {
      ev.preventDefault();
      render();
    }
  });

  rowEls.forEach((el, i) =>
    el.addEventListener("click", (ev) => {
      if (ev.target.closest("button.sample")) return sample(i);
      cursor = i;
      render();
    }),
  );
  mineEls.forEach((chip, i) =>
    chip.addEventListener("click", (ev) => {
      ev.stopPropagation();
      const order = ["evil", "safe", "unsure"];
      const cur = rows[i].label || rows[i].suggestion;
      cursor = i;
      labelAt(i, rows[i].label === null && cur ? cur : order[(order.indexOf(cur) + 1) % 3]);
      render();
    }),
  );
  badEl.addEventListener("change", () => {
    badEl.checked = !badEl.checked; // route through toggleBad so it can be undone
    toggleBad();
    badEl.blur();
    render();
  });
  submitEl.addEventListener("click", () => canSubmit() && submit());

  cursor = rows.length ? nextUndone(rows.length - 1) : 0;
  render();
})();
