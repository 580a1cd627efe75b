-- Broadcast from the database, drop-in with Supabase: schema `realtime` with `messages`,
-- `topic()`, `send`, `send_binary` and `broadcast_changes`. A row inserted into
-- realtime.messages is emitted as a transactional logical decoding message, so it reaches
-- channels when (and only if) its transaction commits, in commit order with row changes.
-- An existing `realtime` schema (Supabase's own) is left exactly as it is.

CREATE TABLE IF NOT EXISTS walcast.settings (
    name  text PRIMARY KEY,
    value text NOT NULL
);

DO $migration$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'realtime') THEN
        INSERT INTO walcast.settings VALUES ('realtime_schema', 'external')
            ON CONFLICT (name) DO NOTHING;
        RETURN;
    END IF;
    INSERT INTO walcast.settings VALUES ('realtime_schema', 'walcast')
        ON CONFLICT (name) DO UPDATE SET value = 'walcast';

    CREATE SCHEMA realtime;

    CREATE TABLE realtime.messages (
        topic          text NOT NULL,
        extension      text NOT NULL,
        payload        jsonb,
        event          text,
        private        boolean DEFAULT false,
        updated_at     timestamp without time zone NOT NULL DEFAULT now(),
        inserted_at    timestamp without time zone NOT NULL DEFAULT now(),
        id             uuid NOT NULL DEFAULT gen_random_uuid(),
        binary_payload bytea,
        PRIMARY KEY (id, inserted_at)
    );
    CREATE INDEX messages_inserted_at_topic_index ON realtime.messages (inserted_at DESC, topic);
    ALTER TABLE realtime.messages ENABLE ROW LEVEL SECURITY;

    CREATE FUNCTION realtime.topic() RETURNS text
        LANGUAGE sql STABLE
        AS $$ SELECT nullif(current_setting('realtime.topic', true), '')::text $$;

    -- Runs with the rights of the role that installed it (which may emit logical messages).
    CREATE FUNCTION realtime.walcast_emit_broadcast() RETURNS trigger
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog
        AS $$
    BEGIN
        IF NEW.extension = 'broadcast' THEN
            PERFORM pg_logical_emit_message(
                true,
                'walcast.broadcast',
                jsonb_build_object(
                    'id', NEW.id,
                    'topic', NEW.topic,
                    'event', NEW.event,
                    'private', coalesce(NEW.private, false),
                    'payload', NEW.payload,
                    'binary_payload', encode(NEW.binary_payload, 'hex')
                )::text
            );
        END IF;
        RETURN NULL;
    END
    $$;

    CREATE TRIGGER walcast_emit_broadcast
        AFTER INSERT ON realtime.messages
        FOR EACH ROW EXECUTE FUNCTION realtime.walcast_emit_broadcast();

    CREATE FUNCTION realtime.send(payload jsonb, event text, topic text, private boolean DEFAULT true)
        RETURNS void
        LANGUAGE plpgsql
        AS $$
    DECLARE
        generated_id uuid;
        final_payload jsonb;
    BEGIN
        BEGIN
            generated_id := gen_random_uuid();
            IF payload ? 'id' THEN
                final_payload := payload;
            ELSE
                final_payload := jsonb_set(payload, '{id}', to_jsonb(generated_id));
            END IF;
            EXECUTE format('SET LOCAL realtime.topic TO %L', topic);
            INSERT INTO realtime.messages (id, payload, event, topic, private, extension)
            VALUES (generated_id, final_payload, event, topic, private, 'broadcast');
        EXCEPTION
            WHEN OTHERS THEN
                RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
        END;
    END
    $$;

    CREATE FUNCTION realtime.send_binary(payload bytea, event text, topic text, private boolean DEFAULT true)
        RETURNS void
        LANGUAGE plpgsql
        AS $$
    DECLARE
        generated_id uuid;
    BEGIN
        BEGIN
            generated_id := gen_random_uuid();
            EXECUTE format('SET LOCAL realtime.topic TO %L', topic);
            INSERT INTO realtime.messages (id, binary_payload, event, topic, private, extension)
            VALUES (generated_id, payload, event, topic, private, 'broadcast');
        EXCEPTION
            WHEN OTHERS THEN
                RAISE WARNING 'WarnSendingBroadcastMessage: %', SQLERRM;
        END;
    END
    $$;

    CREATE FUNCTION realtime.broadcast_changes(
        topic_name text, event_name text, operation text, table_name text, table_schema text,
        NEW record, OLD record, level text DEFAULT 'ROW'
    ) RETURNS void
        LANGUAGE plpgsql
        AS $$
    DECLARE
        row_data jsonb := '{}'::jsonb;
    BEGIN
        IF level = 'STATEMENT' THEN
            RAISE EXCEPTION 'function can only be triggered for each row, not for each statement';
        END IF;
        IF operation = 'INSERT' OR operation = 'UPDATE' OR operation = 'DELETE' THEN
            row_data := jsonb_build_object('old_record', OLD, 'record', NEW, 'operation', operation,
                                           'table', table_name, 'schema', table_schema);
            PERFORM realtime.send(row_data, event_name, topic_name);
        ELSE
            RAISE EXCEPTION 'Unexpected operation type: %', operation;
        END IF;
    EXCEPTION
        WHEN OTHERS THEN
            RAISE EXCEPTION 'Failed to process the row: %', SQLERRM;
    END
    $$;

    GRANT USAGE ON SCHEMA realtime TO PUBLIC;
    GRANT SELECT, INSERT ON realtime.messages TO PUBLIC;
END
$migration$;
