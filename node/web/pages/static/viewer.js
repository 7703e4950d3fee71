// The clinic's image viewer: scroll a series' frames with the wheel or the arrow keys, switch
// window presets without reloading. The page works without it, by links; this only makes the
// same moves faster (the frames around the one shown are fetched ahead).
(function () {
  "use strict";
  var figure = document.getElementById("viewer");
  if (!figure) {
    return;
  }
  var frames = JSON.parse(figure.getAttribute("data-frames"));
  var windowParameter = figure.getAttribute("data-window");
  var index = Number(figure.getAttribute("data-frame")) - 1;
  var image = document.getElementById("frame");
  var number = document.getElementById("frame-number");
  var ahead = new Map();

  function url(i) {
    return frames[i] + (windowParameter ? "?window=" + windowParameter : "");
  }

  function fetchAhead(i) {
    if (i < 0 || i >= frames.length || ahead.has(url(i))) {
      return;
    }
    var next = new Image();
    next.src = url(i);
    ahead.set(url(i), next);
    if (ahead.size > 120) {
      ahead.delete(ahead.keys().next().value);
    }
  }

  function remember(name, value) {
    var query = new URLSearchParams(window.location.search);
    query.set(name, value);
    window.history.replaceState(null, "", "?" + query.toString());
  }

  function show(i) {
    index = Math.min(Math.max(i, 0), frames.length - 1);
    image.src = url(index);
    number.textContent = String(index + 1);
    figure.setAttribute("data-frame", String(index + 1));
    remember("frame", String(index + 1));
    for (var step = 1; step <= 5; step += 1) {
      fetchAhead(index + step);
      fetchAhead(index - step);
    }
  }

  figure.addEventListener("wheel", function (event) {
    event.preventDefault();
    show(index + (event.deltaY > 0 ? 1 : -1));
  }, { passive: false });

  document.addEventListener("keydown", function (event) {
    var moves = { ArrowDown: 1, ArrowRight: 1, PageDown: 10, ArrowUp: -1, ArrowLeft: -1, PageUp: -10 };
    if (event.key in moves) {
      event.preventDefault();
      show(index + moves[event.key]);
    } else if (event.key === "Home" || event.key === "End") {
      event.preventDefault();
      show(event.key === "Home" ? 0 : frames.length - 1);
    }
  });

  document.getElementById("previous").addEventListener("click", function (event) {
    event.preventDefault();
    show(index - 1);
  });
  document.getElementById("next").addEventListener("click", function (event) {
    event.preventDefault();
    show(index + 1);
  });

  document.querySelectorAll("a.preset").forEach(function (link) {
    link.addEventListener("click", function (event) {
      event.preventDefault();
      windowParameter = link.getAttribute("data-window");
      document.querySelectorAll("a.preset").forEach(function (other) {
        other.classList.toggle("chosen", other === link);
      });
      remember("preset", link.getAttribute("data-preset"));
      ahead.clear();
      show(index);
    });
  });

  show(index);
})();
