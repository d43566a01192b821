// Claim keeper: the page that has a prompt open renews its claim (a lease in Redis) every
// third of the lease, so others skip the prompt while it is open and get it back on their
// own once the tab is closed (at once when the page is left). Reads claim_url, release_url
// and renew_ms from the page's JSON data.
(function () {
  "use strict";
  const holder = document.getElementById("page-data");
  if (!holder) return;
  const data = JSON.parse(holder.textContent);
  if (!data.claim_url) return;
  const state = document.getElementById("claim-state");

  function show(claim) {
    held = claim.held;
    const banner = document.getElementById("claimed-msg");
    if (banner && held) banner.classList.add("hidden"); // their claim ended: it is ours now
    if (!state) return;
    state.textContent = claim.held ? "claimed by you" : claim.by ? "claimed by " + claim.by : "";
    state.classList.toggle("other", !claim.held && !!claim.by);
  }

  async function renew() {
    try {
      show(await window.emc.postJSON(data.claim_url));
    } catch (err) {
      /* a missed renewal is retried; the lease outlives two of them */
    }
    setTimeout(renew, data.renew_ms);
  }

  // Leaving the page without saving gives the prompt back at once (saving released it
  // already); the beacon carries the CSRF token as a form field.
  let held = !!(data.claim && data.claim.held);
  window.addEventListener("pagehide", () => {
    if (!held || !data.release_url) return;
    const form = new FormData();
    form.append("csrf_token", document.querySelector('meta[name="csrf-token"]').content);
    navigator.sendBeacon(data.release_url, form);
  });

  if (data.claim) show(data.claim);
  setTimeout(renew, data.renew_ms);
})();
