// What the page scripts share (window.emc): posting JSON with the CSRF token, label lists.
(function () {
  "use strict";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;

  // POST a JSON body (or none); resolves to the parsed answer, rejects with its error.
  async function postJSON(url, body) {
    const headers = { "X-CSRFToken": csrf };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const resp = await fetch(url, {
      method: "POST",
      headers: headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "same-origin",
    });
    const out = await resp.json().catch(() => ({ error: "HTTP " + resp.status }));
    if (!resp.ok) throw new Error(out.error || "HTTP " + resp.status);
    return out;
  }

  // The labels of a page's rows as the server takes them (rows without a label left out).
  function labelList(rows) {
    return rows
      .filter((r) => r.label)
      .map((r) => ({ variant: r.variant, token_id: r.token_id, label: r.label }));
  }

  window.emc = { postJSON: postJSON, labelList: labelList };
})();
