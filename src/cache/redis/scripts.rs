//! The Lua scripts, one per step (`src/cache/lua/`), loaded once.

use std::sync::LazyLock;

use ::redis::Script;

pub(super) struct Scripts {
    pub(super) reserve: Script,
    pub(super) fence: Script,
    pub(super) abandon: Script,
    pub(super) load: Script,
    pub(super) settle: Script,
    pub(super) release: Script,
    pub(super) renew: Script,
    pub(super) committed: Script,
    pub(super) apply: Script,
    pub(super) view: Script,
    pub(super) reap: Script,
    pub(super) orphan: Script,
    pub(super) heartbeat: Script,
    pub(super) dead: Script,
    pub(super) forget: Script,
    pub(super) invalidate: Script,
}

pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    reserve: Script::new(include_str!("../lua/reserve.lua")),
    fence: Script::new(include_str!("../lua/fence.lua")),
    abandon: Script::new(include_str!("../lua/abandon.lua")),
    load: Script::new(include_str!("../lua/load.lua")),
    settle: Script::new(include_str!("../lua/settle.lua")),
    release: Script::new(include_str!("../lua/release.lua")),
    renew: Script::new(include_str!("../lua/renew.lua")),
    committed: Script::new(include_str!("../lua/committed.lua")),
    apply: Script::new(include_str!("../lua/apply.lua")),
    view: Script::new(include_str!("../lua/view.lua")),
    reap: Script::new(include_str!("../lua/reap.lua")),
    orphan: Script::new(include_str!("../lua/orphan.lua")),
    heartbeat: Script::new(include_str!("../lua/heartbeat.lua")),
    dead: Script::new(include_str!("../lua/dead.lua")),
    forget: Script::new(include_str!("../lua/forget.lua")),
    invalidate: Script::new(include_str!("../lua/invalidate.lua")),
});
