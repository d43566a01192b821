// Adjudication page: tokens both reviewers labeled alike start decided; the cursor visits
// the disputed ones. 1 / 2 take the first / second reviewer's label, e/s/u decide
// otherwise, and each decision moves to the next undecided token. When all are decided
// (or the prompt is flagged bad, b), Enter submits and opens the next dispute.
// One disputed token takes two keys: 1 (or 2, e, s, u) and Enter.
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("page-data").textContent);
  const $ = (id) => document.getElementById(id);
  const rows = data.rows.map((r) => Object.assign({}, r, { label: r.decided }));
  const rowEls = rows.map((r) => $("row-" + r.i));
  const mineEls = rowEls.map((el) => el.querySelector('[data-role="mine"]'));
  const badEl = $("bad");
  const noteEl = $("note");
  const submitEl = $("submit");
  const msgEl = $("msg");
  const undo = [];
  let busy = false;
  badEl.checked = data.a_bad && data.b_bad;

  const undecided = () => rows.filter((r) => r.label === null);
  const canSubmit = () => !busy && (undecided().length === 0 || badEl.checked);
  function nextUndecided(from) {
    for (let k = 1; k <= rows.length; k++) {
      const j = (from + k) % rows.length;
      if (rows[j].label === null) return j;
    }
    return from;
  }
  let cursor = rows.length ? nextUndecided(rows.length - 1) : 0;

  function say(text, kind) {
    msgEl.textContent = text;
    msgEl.className = "msg" + (kind ? " " + kind : "");
  }

  function render() {
    rows.forEach((r, i) => {
      rowEls[i].classList.toggle("cursor", i === cursor);
      rowEls[i].classList.toggle("done", r.label !== null);
      mineEls[i].textContent = r.label || "?";
      mineEls[i].className = "chip " + (r.label || "none") + (r.label ? "" : " pending");
    });
    $("done-count").textContent = rows.length - undecided().length;
    submitEl.disabled = !canSubmit();
    rowEls[cursor] && rowEls[cursor].scrollIntoView({ block: "nearest" });
  }

  function decide(label) {
    if (!label) return say("That reviewer left this token unlabeled: press e, s or u.", "warn");
    undo.push({ i: cursor, label: rows[cursor].label, bad: badEl.checked, cursor: cursor });
    rows[cursor].label = label;
    cursor = nextUndecided(cursor);
    say(undecided().length ? "" : "All decided: Enter submits.", undecided().length ? "" : "ok");
  }

  async function submit() {
    busy = true;
    submitEl.disabled = true;
    say("Saving…");
    const body = {
      labels: window.emc.labelList(rows),
      bad_prompt: badEl.checked,
      note: noteEl.value,
      resolves: data.resolves,
    };
    try {
      const out = await window.emc.postJSON(data.submit_url, body);
      say("Saved ✓", "ok");
      window.location.assign(out.next_url);
    } catch (err) {
      busy = false;
      say("Not saved: " + err.message, "error");
      render();
    }
  }

  const LABEL_KEYS = { e: "evil", s: "safe", u: "unsure" };
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.target === noteEl) {
      if (ev.key === "Escape") noteEl.blur();
      return;
    }
    const key = ev.key;
    const r = rows[cursor];
    if (key === "1" && r) decide(r.a);
    else if (key === "2" && r) decide(r.b);
    else if (LABEL_KEYS[key] && r) decide(LABEL_KEYS[key]);
    else if (key === "Enter") {
      if (canSubmit()) submit();
      else say(undecided().length + " token(s) still undecided.", "warn");
    } else if (key === "j" || key === "ArrowDown") cursor = Math.min(rows.length - 1, cursor + 1);
    else if (key === "k" || key === "ArrowUp") cursor = Math.max(0, cursor - 1);
    else if (key === "b") {
      undo.push({ i: null, label: null, bad: badEl.checked, cursor: cursor });
      badEl.checked = !badEl.checked;
    } else if (key === "z") {
      const s = undo.pop();
      if (!s) say("Nothing to undo.", "warn");
      else {
        if (s.i !== null) rows[s.i].label = s.label;
        badEl.checked = s.bad;
        cursor = s.cursor;
      }
    } else if (key === "n") noteEl.focus();
    else if (key === "?") $("guide").classList.toggle("hidden");
    else if (key === "q") window.location.assign(data.list_url);
    else return;
    ev.preventDefault();
    render();
  });
  badEl.addEventListener("change", () => {
    badEl.blur();
    render();
  });
  submitEl.addEventListener("click", () => canSubmit() && submit());
  render();
})();
