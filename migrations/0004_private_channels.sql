-- Private channels: what a role, with its JWT claims, may do on a topic, decided by the
-- row-level security policies on realtime.messages as Supabase Realtime decides it.
--
--   read   the role can SELECT a probe row (topic, extension) that the caller inserted
--   write  the role can INSERT such a row itself
--
-- for extension 'broadcast' and 'presence', with `role`, `realtime.topic`, `request.jwt.claims`,
-- `request.jwt.claim.sub` and `request.jwt.claim.role` set. Everything happens in a
-- subtransaction that is rolled back: no probe row is kept, no broadcast is emitted, and the
-- settings return to the caller's. A policy that raises, or an unknown role, is reported in
-- `error` with every answer false.

CREATE OR REPLACE FUNCTION walcast.topic_access(
    p_topic text, p_role text, p_claims jsonb,
    OUT broadcast_read boolean, OUT broadcast_write boolean,
    OUT presence_read boolean, OUT presence_write boolean, OUT error text)
LANGUAGE plpgsql AS $fn$
DECLARE
    broadcast_probe uuid := gen_random_uuid();
    presence_probe uuid := gen_random_uuid();
BEGIN
    broadcast_read := false;
    broadcast_write := false;
    presence_read := false;
    presence_write := false;
    BEGIN
        INSERT INTO realtime.messages (id, topic, extension)
        VALUES (broadcast_probe, p_topic, 'broadcast'), (presence_probe, p_topic, 'presence');
        PERFORM pg_catalog.set_config('role', p_role, true);
        PERFORM pg_catalog.set_config('realtime.topic', p_topic, true);
        PERFORM pg_catalog.set_config('request.jwt.claims', p_claims::text, true);
        PERFORM pg_catalog.set_config('request.jwt.claim.sub', coalesce(p_claims ->> 'sub', ''), true);
        PERFORM pg_catalog.set_config('request.jwt.claim.role', coalesce(p_claims ->> 'role', ''), true);
        BEGIN
            broadcast_read := EXISTS (SELECT FROM realtime.messages m WHERE m.id = broadcast_probe);
            presence_read := EXISTS (SELECT FROM realtime.messages m WHERE m.id = presence_probe);
        EXCEPTION WHEN insufficient_privilege THEN
            -- No SELECT on the table at all.
            NULL;
        END;
        BEGIN
            INSERT INTO realtime.messages (topic, extension) VALUES (p_topic, 'broadcast');
            broadcast_write := true;
        EXCEPTION WHEN insufficient_privilege THEN
            broadcast_write := false;
        END;
        BEGIN
            INSERT INTO realtime.messages (topic, extension) VALUES (p_topic, 'presence');
            presence_write := true;
        EXCEPTION WHEN insufficient_privilege THEN
            presence_write := false;
        END;
        -- Undo everything above; the answers live in variables, which are not rolled back.
        RAISE EXCEPTION USING ERRCODE = 'WC001', MESSAGE = 'walcast probe rollback';
    EXCEPTION
        WHEN SQLSTATE 'WC001' THEN
            NULL;
        WHEN OTHERS THEN
            broadcast_read := false;
            broadcast_write := false;
            presence_read := false;
            presence_write := false;
            error := SQLERRM;
    END;
END
$fn$;
