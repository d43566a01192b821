// A keyboard list of links (the adjudication list): j/k move, Enter opens, q: the queue.
(function () {
  "use strict";
  const cfg = JSON.parse(document.getElementById("list-data").textContent);
  const rows = Array.from(document.querySelectorAll("table.queue tbody tr"));
  let cursor = 0;
  const mark = () => rows.forEach((tr, i) => tr.classList.toggle("cursor", i === cursor));
  document.addEventListener("keydown", (ev) => {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "j" || ev.key === "ArrowDown") cursor = Math.min(rows.length - 1, cursor + 1);
    else if (ev.key === "k" || ev.key === "ArrowUp") cursor = Math.max(0, cursor - 1);
    else if (ev.key === "Enter" && rows.length) window.location.assign(rows[cursor].dataset.url);
    else if (ev.key === "q") window.location.assign(cfg.queue);
    else return;
    ev.preventDefault();
    mark();
  });
  rows.forEach((tr) =>
    tr.addEventListener("click", (ev) => {
      if (!ev.target.closest("a")) window.location.assign(tr.dataset.url);
    }),
  );
  mark();
})();
