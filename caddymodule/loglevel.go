package caddymodule

import (
	"net/http"
	"strings"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// configLogPath is etcd 3.4's deprecated PUT /config/local/log, which sets
// the level of the server's own logs (capnslog's global level).
const configLogPath = "/config/local/log"

// capnslogLevels maps the level names etcd's capnslog.ParseLevel takes
// (after upper-casing) to zap's. capnslog's NOTICE, between WARNING and
// INFO, is zap's Info, where the member logs its state changes; TRACE is
// Debug, zap's lowest; CRITICAL leaves the panics and fatal errors alone.
var capnslogLevels = map[string]zapcore.Level{
	"CRITICAL": zapcore.DPanicLevel, "C": zapcore.DPanicLevel,
	"ERROR": zapcore.ErrorLevel, "0": zapcore.ErrorLevel, "E": zapcore.ErrorLevel,
	"WARNING": zapcore.WarnLevel, "1": zapcore.WarnLevel, "W": zapcore.WarnLevel,
	"NOTICE": zapcore.InfoLevel, "2": zapcore.InfoLevel, "N": zapcore.InfoLevel,
	"INFO": zapcore.InfoLevel, "3": zapcore.InfoLevel, "I": zapcore.InfoLevel,
	"DEBUG": zapcore.DebugLevel, "4": zapcore.DebugLevel, "D": zapcore.DebugLevel,
	"TRACE": zapcore.DebugLevel, "5": zapcore.DebugLevel, "T": zapcore.DebugLevel,
}

// serveConfigLog is etcd's logHandleFunc: PUT {"Level": "DEBUG"} sets the
// level of the member's logs (Raft, peers, storage, this handler's) and
// answers 204. The level applies on top of Caddy's logging config: it can
// quiet the member, not make it log what Caddy's level leaves out. It
// lasts as long as the member runs (config reloads included), as etcd's
// lasts as long as its process.
func (h *Handler) serveConfigLog(w http.ResponseWriter, r *http.Request) {
	if !allowMethod(w, r, http.MethodPut) {
		return
	}
	var in struct{ Level string }
	if !decodeJSONBody(w, r, &in, "Invalid json body") {
		return
	}
	lvl, ok := capnslogLevels[strings.ToUpper(in.Level)]
	if !ok {
		writeMessage(w, http.StatusBadRequest, "Invalid log level "+in.Level)
		return
	}
	// Said before the change, as etcd does, so it shows at either level.
	h.logger.Info("log level of the member set", zap.String("level", strings.ToUpper(in.Level)),
		zap.Stringer("zap-level", lvl), zap.String("remote", r.RemoteAddr))
	h.member.logLevel.SetLevel(lvl)
	w.WriteHeader(http.StatusNoContent)
}

// levelCore passes on what a member's level (serveConfigLog) and the core
// it wraps both let through.
type levelCore struct {
	zapcore.Core
	lvl zap.AtomicLevel
}

// withMemberLevel wraps lg's core in the member level lvl.
func withMemberLevel(lg *zap.Logger, lvl zap.AtomicLevel) *zap.Logger {
	return lg.WithOptions(zap.WrapCore(func(c zapcore.Core) zapcore.Core { return levelCore{c, lvl} }))
}

func (c levelCore) Enabled(l zapcore.Level) bool { return c.lvl.Enabled(l) && c.Core.Enabled(l) }

func (c levelCore) With(fields []zapcore.Field) zapcore.Core {
	return levelCore{c.Core.With(fields), c.lvl}
}

func (c levelCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if !c.lvl.Enabled(e.Level) {
		return ce
	}
	return c.Core.Check(e, ce)
}
