// Claim keeper: the page that has a prompt open renews its claim (a lease in Redis) every
// third of the lease, so others skip the prompt while it is open and get it back on their
// own once the tab is closed. Reads claim_url and renew_ms from the page's JSON data.
(function () {
  "use strict";
  const holder = document.getElementById("page-data");
  if (!holder) return;
  const data = JSON.parse(holder.textContent);
  if (!data.claim_url) return;
  const state = document.getElementById("claim-state");

  function show(claim) {
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

  if (data.claim) show(data.claim);
  setTimeout(renew, data.renew_ms);
})();
