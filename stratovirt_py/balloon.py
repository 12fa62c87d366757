"""The host's side of the memory balloon: the target, the guest's answer, events, statistics.

QMP `balloon` sets how much memory the guest should keep; the device asks the
guest for the difference (devices/virtio/balloon.py) and the guest answers by
updating `actual`.  `query-balloon` reports boot memory minus what the guest
gave.  Each answer raises BALLOON_CHANGED (and QEMU's BALLOON_CHANGE), at
most one a second as in QEMU (the last value of a burst is never lost).
Statistics are asked for every `guest-stats-polling-interval` seconds once a
client sets one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from stratovirt_py.devices.virtio.balloon import PAGE_SIZE, VirtioBalloon
from stratovirt_py.event_loop import EventLoop, TimerHandle

log = logging.getLogger(__name__)

EVENT_INTERVAL = 1.0
# Below this a Linux guest is likely to die of the balloon's hand.
MIN_TARGET = 64 << 20
STATS_PROPERTY = "guest-stats"
POLLING_PROPERTY = "guest-stats-polling-interval"


class BalloonError(Exception):
    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class Balloon:
    def __init__(self, device_id: str, ram_bytes: int, emit: Callable[[str, dict], None],
                 loop: EventLoop) -> None:
        self.device_id = device_id
        self.ram_bytes = ram_bytes
        self._emit = emit
        self._loop = loop
        self._device: VirtioBalloon | None = None
        self._notify_config_change: Callable[[], None] = lambda: None
        self._last_event = -EVENT_INTERVAL
        self._event_pending: TimerHandle | None = None
        self._polling_interval = 0
        self._polling: TimerHandle | None = None

    @property
    def qom_path(self) -> str:
        return f"/machine/peripheral/{self.device_id}"

    def attach(self, device: VirtioBalloon, notify_config_change: Callable[[], None]) -> None:
        self._device = device
        self._notify_config_change = notify_config_change

    def _attached(self) -> VirtioBalloon:
        if self._device is None:
            raise BalloonError("No balloon device has been activated", "DeviceNotActive")
        return self._device

    # The target and the guest's answer.

    def set_target(self, value: int) -> None:
        device = self._attached()
        if value <= 0:
            raise BalloonError("Parameter 'value' expects a size")
        if value < MIN_TARGET:
            raise BalloonError(f"Parameter 'value' must be at least {MIN_TARGET} bytes "
                               f"({MIN_TARGET >> 20} MiB), got {value}")
        target = min(value, self.ram_bytes)
        device.set_target_pages((self.ram_bytes - target) // PAGE_SIZE)
        self._notify_config_change()
        log.info("balloon: target %d MiB of %d MiB", target >> 20, self.ram_bytes >> 20)

    def actual(self) -> int:
        """Boot memory minus what the guest has given (query-balloon's `actual`)."""
        return self.ram_bytes - self._attached().actual * PAGE_SIZE

    def on_actual_change(self, pages: int) -> None:
        """The guest wrote `actual` (a vCPU thread)."""
        self._loop.call_soon_threadsafe(self._changed)

    def _changed(self) -> None:
        if self._event_pending is not None:
            return  # the pending event will carry the latest value
        wait = self._last_event + EVENT_INTERVAL - time.monotonic()
        if wait <= 0:
            self._send_event()
        else:
            self._event_pending = self._loop.call_later(wait, self._send_event)

    def _send_event(self) -> None:
        self._event_pending = None
        self._last_event = time.monotonic()
        actual = self.actual()
        # StratoVirt's tools wait for BALLOON_CHANGED, libvirt for QEMU's BALLOON_CHANGE.
        self._emit("BALLOON_CHANGED", {"actual": actual})
        self._emit("BALLOON_CHANGE", {"actual": actual})

    # Statistics, as QEMU's qom-get/qom-set on the balloon's path.

    def _check_path(self, path: str) -> VirtioBalloon:
        device = self._attached()
        if path.rstrip("/") != self.qom_path:
            raise BalloonError(f"Device '{path}' not found", "DeviceNotFound")
        return device

    def qom_get(self, path: str, name: str) -> Any:
        device = self._check_path(path)
        if name == POLLING_PROPERTY:
            return self._polling_interval
        if name == STATS_PROPERTY:
            stats, updated = device.guest_stats()
            return {"stats": stats, "last-update": updated}
        raise BalloonError(f"Property 'virtio-balloon-device.{name}' not found")

    def qom_set(self, path: str, name: str, value: Any) -> None:
        self._check_path(path)
        if name != POLLING_PROPERTY:
            raise BalloonError(f"Property 'virtio-balloon-device.{name}' not found or "
                               "not writable")
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**31:
            raise BalloonError("guest-stats-polling-interval must be a whole number of "
                               "seconds, 0 (off) or more")
        self._polling_interval = value
        if self._polling is not None:
            self._polling.cancel()
            self._polling = None
        if value:
            self._poll()

    def _poll(self) -> None:
        self._attached().request_stats()
        self._polling = self._loop.call_later(self._polling_interval, self._poll)

    def close(self) -> None:
        for handle in (self._event_pending, self._polling):
            if handle is not None:
                handle.cancel()
        self._event_pending = self._polling = None
